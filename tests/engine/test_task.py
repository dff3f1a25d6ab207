"""The Task API in process: what loss_fn may return, batches on the device, batch-size-weighted
epoch metrics, no validation data, an optimizer factory, exact resume with DataLoader workers
and with a stateful iterable dataset, and BatchNorm buffers never seen half-updated by a save."""

from __future__ import annotations

import importlib.util
import shutil
import threading
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from utils.training import Task, TrainingConfig
from utils.training.engine.checkpoint import (
    MODEL_FILE,
    CheckpointManager,
    StateBuffers,
    list_checkpoints,
    load_checkpoint,
)
from utils.training.engine.metrics_log import METRICS_FILE, STEPS_FILE, read_metrics_log, read_steps_log
from utils.training.engine.task import TaskError, move_to_device, split_loss_output
from utils.training.engine.trainer import Trainer

TIMING = {"epoch_seconds", "samples_per_second", "time"}
spec = importlib.util.spec_from_file_location("mytask", Path(__file__).parent / "user_tasks" / "mytask.py")
mytask = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mytask)


def config(workspace: Path, **overrides: Any) -> TrainingConfig:
    settings = dict(workspace_root=str(workspace), run_name="t", epochs=2, steps_per_epoch=0, eval_batches=0,
                    batch_size=8, save_every_seconds=0, device="cpu", keep_last=0)  # fmt: skip
    return TrainingConfig(**{**settings, **overrides})


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ((torch.tensor(1.0), {"loss": 1.0}), "'loss' is not allowed"),
        ((torch.tensor(1.0), {"val/acc": 1.0}), "'val/acc' is not allowed"),
        ((torch.tensor(1.0), {"step": 1.0}), "'step' is not allowed"),
        ((torch.tensor(1.0), {"acc": torch.ones(3)}), "0-d tensor"),
        ((torch.tensor(1.0), {"acc": "high"}), "not a finite number"),
        ((torch.ones(2), {}), "scalar loss"),
        (1.0, "scalar loss"),
    ],
)
def test_what_loss_fn_returns_is_checked(output: Any, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        split_loss_output(output)


def test_a_metric_may_be_a_float_or_a_0d_tensor() -> None:
    loss, metrics = split_loss_output((torch.tensor(0.5), {"a": 1.0, "b": torch.tensor(2.0)}))
    assert float(loss) == 0.5 and metrics["a"] == 1.0 and float(metrics["b"]) == 2.0


class Encoding(dict):
    """Stands in for transformers' BatchEncoding: a dict subclass that must keep its type."""


def test_batches_are_moved_recursively_keeping_their_types() -> None:
    Pair = namedtuple("Pair", "x y")
    batch = {"enc": Encoding(ids=torch.ones(2)), "pair": Pair(torch.zeros(1), [torch.ones(1), 3]), "name": "b"}
    moved = move_to_device(batch, torch.device("meta"))
    assert isinstance(moved["enc"], Encoding) and moved["enc"]["ids"].device.type == "meta"
    assert isinstance(moved["pair"], Pair) and moved["pair"].x.device.type == "meta"
    assert moved["pair"].y[0].device.type == "meta" and moved["pair"].y[1] == 3 and moved["name"] == "b"


def _mean_task(val: bool = True, **fields: Any):
    """Ten samples whose value is their index; with lr 0 the metric is the data's own mean."""
    data = TensorDataset(torch.arange(10, dtype=torch.float32).unsqueeze(1))

    def loss_fn(model: nn.Module, batch: Any) -> Any:
        (x,) = batch
        return model(x).mean() * 0 + x.mean(), {"value": x.mean(), "rows": float(len(x))}

    def build(cfg: TrainingConfig) -> Task:
        return Task(model=nn.Linear(1, 1), train_data=data, val_data=data if val else None, loss_fn=loss_fn,
                    make_optimizer=lambda m, c: torch.optim.SGD(m.parameters(), lr=0.0), **fields)  # fmt: skip

    return build


def test_epoch_metrics_are_batch_size_weighted_means(tmp_path: Path) -> None:
    # batches of 4, 4 and 2: weighted, the mean is 4.5; a mean of batch means would not be
    results = Trainer(config(tmp_path, batch_size=4, epochs=1), build_task=_mean_task(), progress=False).fit()
    row = results["metrics_history"][0]
    assert row["step"] == 3  # one full pass: ceil(10 / 4) steps
    assert row["train/value"] == pytest.approx(4.5) and row["val/value"] == pytest.approx(4.5)
    assert row["train/loss"] == pytest.approx(4.5) and row["val/loss"] == pytest.approx(4.5)
    assert row["train/rows"] == pytest.approx((4 * 4 + 4 * 4 + 2 * 2) / 10)
    assert "val/perplexity" not in row and "tokens_per_second" not in row  # language-model columns only
    assert {
        "epoch",
        "train/loss",
        "learning_rate",
        "grad_norm",
        "drift/grad_norm_var",
        "drift/update_ratio/weight",
    } <= set(row)
    assert results["task"].endswith("_mean_task.<locals>.build")


def test_drop_last_leaves_out_the_short_batch_of_each_pass(tmp_path: Path) -> None:
    results = Trainer(config(tmp_path, batch_size=4, epochs=2), build_task=_mean_task(drop_last=True),
                      progress=False).fit()  # fmt: skip
    rows = results["metrics_history"]
    assert [r["step"] for r in rows] == [2, 4]  # 10 samples: two batches of 4 an epoch
    assert all(r["train/rows"] == 4.0 for r in rows)


def test_without_validation_data_the_newest_checkpoint_is_the_best(tmp_path: Path) -> None:
    trainer = Trainer(config(tmp_path, batch_size=4), build_task=_mean_task(val=False), progress=False)
    results = trainer.fit()
    assert "val/loss" not in results["metrics_history"][-1]
    assert results["best_checkpoint_path"] == results["checkpoint_path"]
    assert sum("no validation data" in m for m in trainer.messages) == 1  # said once


def test_an_optimizer_factory_with_its_own_scheduler_is_used(tmp_path: Path) -> None:
    def make(model: nn.Module, cfg: TrainingConfig) -> Any:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    build = mytask.build

    def with_factory(cfg: TrainingConfig) -> Task:
        task = build(cfg)
        task.make_optimizer = make
        return task

    results = Trainer(config(tmp_path, epochs=1, steps_per_epoch=3), build_task=with_factory, progress=False).fit()
    assert results["metrics_history"][0]["learning_rate"] == 0.5 * 0.5**3


def _resume_from(workspace: Path, copy: Path, step: int) -> None:
    """What a runtime that died right after the checkpoint of `step` leaves behind."""
    shutil.copytree(workspace, copy)
    for found, path in list_checkpoints(copy / "checkpoints" / "t"):
        if found > step:
            shutil.rmtree(path)


def _assert_same_run(a: Path, b: Path, step: int) -> None:
    final = f"step-{step:06d}"
    left = load_checkpoint(a / "checkpoints" / "t" / final).model_state
    right = load_checkpoint(b / "checkpoints" / "t" / final).model_state
    assert all(left[k].equal(right[k]) for k in left), "weights differ"
    assert without_timing(read_metrics_log(a / "checkpoints" / "t" / METRICS_FILE)) == without_timing(
        read_metrics_log(b / "checkpoints" / "t" / METRICS_FILE)
    )
    steps = [without_timing(read_steps_log(w / "checkpoints" / "t" / STEPS_FILE)) for w in (a, b)]
    assert steps[0] == steps[1] and steps[0]


def test_a_mid_epoch_resume_with_dataloader_workers_is_exact(tmp_path: Path) -> None:
    cfg = config(tmp_path / "ref", save_every_steps=5, log_every_steps=4, task_options={"workers": 2})
    Trainer(cfg, build_task=mytask.build, progress=False).fit()
    _resume_from(tmp_path / "ref", tmp_path / "resumed", 5)  # mid-epoch 1 (12 steps an epoch)
    results = Trainer(cfg.replace(workspace_root=str(tmp_path / "resumed")), build_task=mytask.build,
                      progress=False).fit()  # fmt: skip
    assert results["resume_count"] == 1
    _assert_same_run(tmp_path / "ref", tmp_path / "resumed", 24)


class CountingStream(IterableDataset):
    """An iterable dataset with its own state: the position in a seeded stream of samples."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.position)
            self.position += 1
            x = torch.randn(8, generator=g)
            yield x, (x[0] > 0).long()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def _stream_task(cfg: TrainingConfig) -> Task:
    task = mytask.build(cfg)
    task.train_data = CountingStream()
    return task


def test_a_stateful_iterable_dataset_resumes_exactly(tmp_path: Path) -> None:
    cfg = config(tmp_path / "ref", steps_per_epoch=6, save_every_steps=4, log_every_steps=3)
    Trainer(cfg, build_task=_stream_task, progress=False).fit()
    _resume_from(tmp_path / "ref", tmp_path / "resumed", 4)
    Trainer(cfg.replace(workspace_root=str(tmp_path / "resumed")), build_task=_stream_task, progress=False).fit()
    _assert_same_run(tmp_path / "ref", tmp_path / "resumed", 12)


def test_an_iterable_without_length_needs_steps_per_epoch(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="steps_per_epoch"):
        Trainer(config(tmp_path), build_task=_stream_task, progress=False).fit()


def test_an_async_save_keeps_batchnorm_statistics_of_the_moment_it_was_called(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mytask.Net()
    model(torch.randn(16, 8))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    release = threading.Event()

    class SlowBuffers(StateBuffers):
        """A writer thread that takes its copy late (a busy machine): it waits for the test."""

        def fill_file(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Any:
            if name == MODEL_FILE:
                release.wait(30)
            return super().fill_file(name, tensors, metadata)

    with CheckpointManager(tmp_path, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min",
                           async_save=True) as manager:  # fmt: skip
        manager._buffers = SlowBuffers()
        manager.save(1, model=model, training_state={}, trainer_state={"step": 1})
        for _ in range(3):
            model(torch.randn(16, 8) * 5)  # the next forward passes update running_mean/var in place
        release.set()
    saved = load_checkpoint(tmp_path / "step-000001").model_state
    assert not model.body[1].running_mean.equal(expected["body.1.running_mean"])
    for name, value in expected.items():
        assert saved[name].equal(value), f"{name} was saved half-updated"
    assert manager.best_step() == manager.latest_step() == 1


def test_a_checkpoint_loads_for_inference_only_with_its_recorded_builder(tmp_path: Path) -> None:
    from utils.training.analysis import load_task_model
    from utils.training.engine.trainer import TaskMismatch

    results = Trainer(config(tmp_path, epochs=1, steps_per_epoch=2), build_task=mytask.build, task_path="mytask:build",
                      progress=False).fit()  # fmt: skip
    with pytest.raises(TaskMismatch, match="mytask:build"):
        load_task_model(results["best_checkpoint_path"])
    model, task = load_task_model(results["best_checkpoint_path"], build_task=mytask.build, task_path="mytask:build")
    saved = load_checkpoint(Path(results["best_checkpoint_path"])).model_state
    assert not model.training and all(v.equal(saved[k]) for k, v in model.state_dict().items())
    assert task.sample_fn is None


def test_events_are_emitted_as_they_happen_with_each_epoch_row(tmp_path: Path) -> None:
    import logging

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("utils.training.events")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        cfg = config(tmp_path, epochs=2, steps_per_epoch=3, save_every_steps=2, async_save=False)
        results = Trainer(cfg, build_task=mytask.build, progress=False).fit()
        Trainer(cfg.replace(epochs=3), build_task=mytask.build, progress=False).fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    rows = [r.epoch_row for r in records if hasattr(r, "epoch_row")]
    assert rows[:2] == results["metrics_history"] and rows[2]["epoch"] == 3
    messages = [r.getMessage() for r in records]
    saved = [m for m in messages if m.startswith("checkpoint step-")]
    assert saved[:4] == [f"checkpoint step-{s:06d} saved" for s in (2, 3, 4, 6)]
    order = [m for m in messages if m.startswith(("checkpoint step-000004", "epoch 2"))]
    assert order[0].startswith("checkpoint step-000004")  # as it happened, not at the end
    assert any(m.startswith("resumed from") and "step-000006" in m for m in messages)
