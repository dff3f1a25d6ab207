"""`python -m utils.training train --tensorboard` SIGKILLed mid-run, its newest checkpoint damaged so the
resume falls back to an older one, then resumed: the event files read back hold each step exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from utils.training.engine.checkpoint import MODEL_FILE, list_checkpoints  # noqa: E402
from utils.training.engine.metrics_log import METRICS_FILE, STEPS_FILE  # noqa: E402
from utils.training.integrations.tensorboard import tensorboard_dir  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
EPOCHS, STEPS_PER_EPOCH = 3, 12
TOTAL = EPOCHS * STEPS_PER_EPOCH


def command(workspace: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "utils.training", "train", "--preset", "tiny", "--corpus", str(corpus),
            "--workspace", str(workspace), "--run-name", "tb", "--epochs", str(EPOCHS),
            "--steps-per-epoch", str(STEPS_PER_EPOCH), "--save-every-steps", "4", "--keep-last", "3",
            "--log-every-steps", "1", "--device", "cpu", "--tensorboard", "--json"]  # fmt: skip


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return found[0][0] if found else 0


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_a_killed_and_resumed_run_has_each_step_once_in_tensorboard(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(os.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    workspace = tmp_path / "ws"
    run_dir = workspace / "checkpoints" / "tb"
    proc = subprocess.Popen(command(workspace, corpus), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while newest_step(run_dir) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    proc.stderr.close()
    killed_at = newest_step(run_dir)
    assert 20 <= killed_at < TOTAL, "the run finished before it could be killed"
    # The newest checkpoint's steps were flushed to the event files before it committed; with it
    # damaged the resume starts 4 steps earlier, so those events must be purged, not doubled.
    model = run_dir / f"step-{killed_at:06d}" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))

    done = subprocess.run(command(workspace, corpus), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert results["completed"] and any(f"skipping checkpoint {model.parent}" in m for m in results["messages"])

    log_dir = tensorboard_dir(workspace, "tb")
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one file per process
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/train/loss", "step/learning_rate", "step/grad_norm", "train/loss", "val/loss"} <= tags
    assert "step/time" not in tags and "step/step" not in tags
    step_rows = lines(run_dir / STEPS_FILE)
    step_events = events.Scalars("step/train/loss")
    assert [e.step for e in step_events] == list(range(1, TOTAL + 1)) == [r["step"] for r in step_rows]
    assert [e.value for e in step_events] == pytest.approx([r["train/loss"] for r in step_rows], rel=1e-6)
    epoch_rows = lines(run_dir / METRICS_FILE)
    for tag in ("train/loss", "val/loss"):
        epoch_events = events.Scalars(tag)
        assert [e.step for e in epoch_events] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
        assert [e.value for e in epoch_events] == pytest.approx([r[tag] for r in epoch_rows], rel=1e-6)


def test_with_the_setting_off_tensorboard_is_not_imported(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(os.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    code = (
        "import sys\n"
        "from utils.training.config import TrainingConfig\n"
        "from utils.training.engine.trainer import train\n"
        f"config = TrainingConfig.from_preset('tiny', corpus={str(corpus)!r}, workspace_root={str(tmp_path / 'ws')!r},\n"
        "                                     run_name='off', epochs=1, steps_per_epoch=4, device='cpu')\n"
        "assert train(config, progress=False)['completed']\n"
        "loaded = [m for m in sys.modules if 'tensorboard' in m]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "ws" / "tensorboard").exists()
