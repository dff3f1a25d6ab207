"""CheckpointedRun: a hand-written loop that restores, logs, saves on a cadence and closes; a run
stopped after a checkpoint and continued ends bit-identical, and recovery reads it like any run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from utils.training import CheckpointedRun, TrainingConfig
from utils.training.engine.checkpoint import load_checkpoint
from utils.training.engine.metrics_log import METRICS_FILE, STEPS_FILE, read_metrics_log, read_steps_log
from utils.training.engine.recovery import recover

spec = importlib.util.spec_from_file_location("mytask", Path(__file__).parent / "user_tasks" / "mytask.py")
mytask = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mytask)
STEPS_PER_EPOCH, TOTAL = 6, 18


class Batches:
    """A data position with state_dict/load_state_dict: batch k is a pure function of k."""

    def __init__(self) -> None:
        self.position = 0
        self.data = mytask.make_data(48, seed=0)

    def next(self):
        g = torch.Generator().manual_seed(self.position)
        self.position += 1
        idx = torch.randperm(len(self.data), generator=g)[:8]
        return self.data[idx]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def train(workspace: Path, stop_after: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = mytask.Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    data = Batches()
    config = TrainingConfig(save_every_steps=5, save_every_seconds=0, keep_last=0)
    with CheckpointedRun(workspace, "loop", model=model, optimizer=optimizer, scheduler=scheduler, data=data,
                         config=config) as run:  # fmt: skip
        step = run.restore()
        while step < TOTAL:
            loss, metrics = mytask.loss_fn(model, data.next())  # dropout draws from the torch RNG
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            run.log(step, {"loss": loss.item(), "accuracy": metrics["accuracy"].item()})
            if step % STEPS_PER_EPOCH == 0:
                run.end_epoch(step // STEPS_PER_EPOCH, {"loss": loss.item(), "val/loss": loss.item() * 2})
            run.maybe_save(step)
            if step == stop_after:
                return model  # as if the runtime died here: the lines past step 10 are not in a checkpoint
        run.save(step)
    return model


def test_a_loop_stopped_after_a_checkpoint_continues_bit_identical(tmp_path: Path) -> None:
    reference = train(tmp_path / "ref")
    train(tmp_path / "cut", stop_after=13)
    resumed = train(tmp_path / "cut")
    for name, value in reference.state_dict().items():
        assert value.equal(resumed.state_dict()[name]), name
    run_dirs = [w / "checkpoints" / "loop" for w in (tmp_path / "ref", tmp_path / "cut")]
    steps = [[{k: v for k, v in r.items() if k != "time"} for r in read_steps_log(d / STEPS_FILE)] for d in run_dirs]
    assert steps[0] == steps[1] and [r["step"] for r in steps[1]] == list(range(1, TOTAL + 1))
    epochs = [
        [{k: v for k, v in r.items() if k != "time"} for r in read_metrics_log(d / METRICS_FILE)] for d in run_dirs
    ]
    assert epochs[0] == epochs[1] and len(epochs[1]) == 3

    results = recover(tmp_path / "cut", search_dirs=[])
    assert results["step"] == TOTAL and results["epoch"] == 3 and len(results["metrics_history"]) == 3
    assert results["task"] == "loop:CheckpointedRun" and len(results["step_history"]) == TOTAL
    saved = load_checkpoint(Path(results["checkpoint_path"]))
    assert saved.training_state["data"] == {"position": TOTAL}
    assert results["best_epoch"] == min(results["metrics_history"], key=lambda r: r["val/loss"])["epoch"]


def test_logging_before_restore_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    with CheckpointedRun(tmp_path, "x", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) as run:
        with pytest.raises(RuntimeError, match="restore"):
            run.log(1, {"loss": 1.0})
        assert run.restore() == 0


@pytest.mark.parametrize("release", [False, True], ids=["kept", "released"])
def test_release_snapshot_buffers_frees_the_host_copy_after_each_save(tmp_path: Path, release: bool) -> None:
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = TrainingConfig(save_every_seconds=0, release_snapshot_buffers=release)
    with CheckpointedRun(tmp_path, "x", model=model, optimizer=optimizer, config=config) as run:
        step = run.restore()
        for step in range(1, 3):
            model(torch.randn(4, 64)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            run.log(step, {"loss": 1.0})
            run.save(step)
            run.wait_until_finished()
            # weights and both AdamW moments of the 64x64 layer: the snapshot's float32 copy
            held = run.manager._buffers.resident_bytes()
            assert held == 0 if release else held >= 3 * 64 * 64 * 4
    saved = tmp_path / "checkpoints" / "x" / "step-000002"
    assert load_checkpoint(saved).step == 2
    assert (saved / "training_state.safetensors").is_file() and not (saved / "training_state.pt").exists()


LOOP = """
import sys, torch
from utils.training import CheckpointedRun, TrainingConfig
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
config = TrainingConfig(save_every_steps=2, keep_last=2, save_every_seconds=0)
with CheckpointedRun(sys.argv[1], "loop", model=model, optimizer=optimizer, config=config) as run:
    step = run.restore()
    while step < 120:
        x = torch.randn(16, 4)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        run.log(step, {"loss": loss.item()})
        run.maybe_save(step)
"""


@pytest.mark.slow
def test_a_loop_killed_with_sigkill_continues_bit_identical(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from utils.training.engine.checkpoint import list_checkpoints, read_model_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path / "ref")], env=env)
    run_dir = tmp_path / "killed" / "checkpoints" / "loop"
    victim = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path / "killed")], env=env)
    deadline = time.monotonic() + 120
    while not list_checkpoints(run_dir) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    killed_at = list_checkpoints(run_dir)[0][0]
    assert 0 < killed_at < 120
    subprocess.run([sys.executable, "-c", LOOP, str(tmp_path / "killed")], env=env, check=True, timeout=300)
    assert reference.wait(timeout=300) == 0
    final = read_model_file(run_dir / "step-000120" / "model.safetensors")
    expected = read_model_file(tmp_path / "ref" / "checkpoints" / "loop" / "step-000120" / "model.safetensors")
    assert all(expected[k].equal(final[k]) for k in expected)
    rows = [
        [{k: v for k, v in r.items() if k != "time"} for r in read_steps_log(w / "checkpoints" / "loop" / STEPS_FILE)]
        for w in (tmp_path / "ref", tmp_path / "killed")
    ]
    assert rows[0] == rows[1] and [r["step"] for r in rows[1]] == list(range(1, 121))
