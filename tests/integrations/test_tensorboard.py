"""TensorBoard: real event files, read back with tensorboard's EventAccumulator; a resume leaves no step twice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from utils.training.integrations.tensorboard import (  # noqa: E402
    TensorBoardEvents,
    TensorBoardLogger,
    tensorboard_dir,
)


def _read(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _first_session(workspace: Path) -> None:
    with TensorBoardLogger.for_run(workspace, "r") as tb:  # killed after step 10, checkpoint at step 6
        for step in range(1, 11):
            tb.log_step(step, {"step": step, "train/loss": float(step), "time": 1e9})
        tb.log_epoch(5, {"epoch": 1, "step": 5, "val/loss": 0.5})
        tb.log_epoch(10, {"epoch": 2, "step": 10, "val/loss": 0.25})


def test_resume_purges_the_steps_past_the_checkpoint(tmp_path: Path) -> None:
    _first_session(tmp_path)
    with TensorBoardLogger.for_run(tmp_path, "r", start_step=6) as tb:  # the resumed process
        for step in range(7, 13):
            tb.log_step(step, {"train/loss": 100.0 + step})
        tb.log_epoch(10, {"epoch": 2, "step": 10, "val/loss": 0.125})
    log_dir = tensorboard_dir(tmp_path, "r")
    assert log_dir == tmp_path / "tensorboard" / "r" and len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    steps = _read(log_dir, "step/train/loss")
    assert [s for s, _ in steps] == list(range(1, 13))  # each step once
    assert [v for _, v in steps] == [float(s) for s in range(1, 7)] + [100.0 + s for s in range(7, 13)]
    assert _read(log_dir, "val/loss") == [(5, 0.5), (10, 0.125)]
    assert "step/time" not in EventAccumulator(str(log_dir)).Reload().Tags()["scalars"]


def test_without_purge_the_replayed_steps_would_appear_twice(tmp_path: Path) -> None:
    """The control: the same two sessions, the second without purge_step, duplicate steps 7-10."""
    from torch.utils.tensorboard import SummaryWriter

    _first_session(tmp_path)
    with SummaryWriter(log_dir=str(tensorboard_dir(tmp_path, "r"))) as writer:
        for step in range(7, 13):
            writer.add_scalar("step/train/loss", 100.0 + step, global_step=step)
    steps = [s for s, _ in _read(tensorboard_dir(tmp_path, "r"), "step/train/loss")]
    assert len(steps) == 16 and steps.count(8) == 2


def test_epoch_rows_from_the_trainers_events_logger(tmp_path: Path) -> None:
    handler = TensorBoardEvents(TensorBoardLogger.for_run(tmp_path, "r")).attach()
    events = logging.getLogger("utils.training.events")
    level = events.level
    events.setLevel(logging.INFO)
    try:
        events.info("epoch 1 done", extra={"epoch_row": {"epoch": 1, "step": 4, "train/loss": 2.0}})
        events.info("checkpoint saved at step 4")  # a plain message: nothing to log
    finally:
        events.setLevel(level)
        handler.detach()
    assert _read(tensorboard_dir(tmp_path, "r"), "train/loss") == [(4, 2.0)]


def test_config_setting_and_cli_flag() -> None:
    from utils.training.__main__ import build_config, make_parser
    from utils.training.config import ConfigError, TrainingConfig

    assert TrainingConfig().tensorboard is False
    assert build_config(make_parser().parse_args(["train", "--tensorboard"])).tensorboard is True
    assert build_config(make_parser().parse_args(["train"])).tensorboard is False
    with pytest.raises(ConfigError, match="tensorboard"):
        TrainingConfig(tensorboard="yes")


def test_tensorboard_for_a_config(tmp_path: Path) -> None:
    from utils.training.config import TrainingConfig
    from utils.training.integrations.tensorboard import tensorboard_for

    assert tensorboard_for(TrainingConfig(workspace_root=str(tmp_path)), start_step=0) is None
    config = TrainingConfig(workspace_root=str(tmp_path), run_name="r", tensorboard=True)
    with tensorboard_for(config, start_step=3) as tb:
        tb.log_step(4, {"train/loss": 1.0})
    assert _read(tmp_path / "tensorboard" / "r", "step/train/loss") == [(4, 1.0)]
