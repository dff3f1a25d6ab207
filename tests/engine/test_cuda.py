"""CUDA paths (AMP, pinned async copies, NCCL). Skipped on machines without a GPU; run them
where one is lent: `pytest tests/engine/test_cuda.py`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.training.config import TrainingConfig
from utils.training.engine.checkpoint import CheckpointManager, load_checkpoint, read_model_file
from utils.training.engine.recovery import recover
from utils.training.engine.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_config(workspace: Path, **overrides) -> TrainingConfig:
    return TrainingConfig.from_preset(
        "tiny", workspace_root=str(workspace), run_name="cuda", device="cuda", epochs=2, steps_per_epoch=10,
        save_every_seconds=0, **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_training_checkpoints_and_resumes(tmp_path: Path, precision: str) -> None:
    config = cuda_config(tmp_path, precision=precision, save_every_steps=5, keep_last=0)
    results = Trainer(config, progress=False).fit()
    assert results["completed"]
    assert all(math.isfinite(r["val/loss"]) for r in results["metrics_history"])
    loaded = load_checkpoint(Path(results["checkpoint_path"]))
    assert all(t.dtype == torch.float32 for t in loaded.model_state.values())  # AMP keeps fp32 master weights
    if precision == "fp16":
        assert loaded.training_state["scaler"]["scale"] > 0  # the GradScaler's state is in the checkpoint
    # Resume from the mid-run step checkpoint and finish again.
    for path in Path(results["run_dir"]).glob("step-*"):
        if int(path.name[5:]) > 5:
            import shutil

            shutil.rmtree(path)
    resumed = Trainer(config, progress=False).fit()
    assert resumed["completed"] and resumed["resume_count"] == 1
    assert [r["epoch"] for r in resumed["metrics_history"]] == [1, 2]


def test_async_save_copies_into_pinned_buffers(tmp_path: Path) -> None:
    model = torch.nn.Linear(256, 256).cuda()
    manager = CheckpointManager(tmp_path, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    manager.save(1, model_state=model.state_dict(), training_state={}, trainer_state={"step": 1})
    with torch.no_grad():
        model.weight.add_(1.0)  # queued after the non-blocking copies on the same stream
    manager.wait_until_finished()
    buffers = manager._buffers._buffers.values()
    assert buffers and all(b.is_pinned() for b in buffers)
    saved = read_model_file(tmp_path / "step-000001" / "model.safetensors")
    assert all(torch.equal(saved[k], state[k].cpu()) for k in state)


def test_sync_saves_write_each_steps_own_tensors(tmp_path: Path) -> None:
    """Issue 10 item 6: the sync path waits for its device-to-host copies. A long kernel queued
    before each save delays the copies; a writer that did not wait would write the pinned
    buffers' old bytes (the previous save's, or never-written memory) and hash them."""
    model = torch.nn.Linear(1024, 1024).cuda()
    manager = CheckpointManager(tmp_path, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min",
                                async_save=False)  # fmt: skip
    expected = {}
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(-float(step))
        expected[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.cuda._sleep(200_000_000)  # the copies queue behind this kernel
        manager.save(step, model_state=model.state_dict(), training_state={}, trainer_state={"step": step})
    manager.close()
    for step in (1, 2):
        saved = read_model_file(tmp_path / f"step-{step:06d}" / "model.safetensors")
        assert all(torch.equal(saved[k], expected[step][k]) for k in expected[step]), step


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_two_gpu_run_with_nccl(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
        "utils.training", "train", "--preset", "tiny", "--workspace", str(tmp_path), "--run-name", "nccl",
        "--epochs", "2", "--steps-per-epoch", "10", "--save-every-steps", "5",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = recover(tmp_path, search_dirs=[])
    assert results["completed"] and [r["epoch"] for r in results["metrics_history"]] == [1, 2]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_two_saves_of_gpu_tensors_each_hold_their_own_step(tmp_path: Path, async_save: bool) -> None:
    """Pinned buffers are reused: a sync save that wrote before its device-to-host copies finished
    would write the previous save's bytes (and hash them, so verify would pass)."""
    from test_state_buffers import _two_saves_hold_their_own_tensors  # tests/engine is on sys.path (rootdir import)

    _two_saves_hold_their_own_tensors(tmp_path, "cuda", async_save=async_save)
