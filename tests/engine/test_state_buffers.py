"""Reused snapshot buffers: each save's files hold that save's tensors, for sync and async saves;
a sync save never writes from a device-to-host copy it has not waited for; buffers can be freed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils.training.engine.checkpoint import (
    CheckpointManager,
    StateBuffers,
    copies_non_blocking,
    load_checkpoint,
)
from utils.training.engine.snapshot import PAGE_BYTES


def _two_saves_hold_their_own_tensors(run_dir: Path, device: str, *, async_save: bool) -> None:
    model = torch.nn.Linear(64, 64).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    expected = {}
    with CheckpointManager(
        run_dir, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min", async_save=async_save
    ) as manager:
        for step in (1, 2):
            model.weight.grad = torch.full_like(model.weight, float(step))
            model.bias.grad = torch.full_like(model.bias, float(step))
            optimizer.step()
            expected[step] = (
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                optimizer.state_dict()["state"][0]["exp_avg"].cpu().clone(),
            )
            manager.save(
                step,
                model_state=model.state_dict(),
                training_state={"optimizer": optimizer.state_dict()},
                trainer_state={"step": step},
            )
            manager.wait_for_snapshot()
            with torch.no_grad():
                model.weight.add_(100.0)  # the next step's change: must not reach the file of this one
    for step, (weights, exp_avg) in expected.items():
        loaded = load_checkpoint(run_dir / f"step-{step:06d}")
        for name, tensor in weights.items():
            assert torch.equal(loaded.model_state[name], tensor), f"step {step}: {name} holds another step's values"
        assert torch.equal(loaded.training_state["optimizer"]["state"][0]["exp_avg"], exp_avg), f"step {step}"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_two_saves_on_the_cpu_each_hold_their_own_step(tmp_path: Path, async_save: bool) -> None:
    _two_saves_hold_their_own_tensors(tmp_path, "cpu", async_save=async_save)


def test_only_an_async_save_queues_a_device_copy_without_waiting() -> None:
    on_device = torch.empty(4, device="meta")  # stands for a GPU tensor: the rule looks at the device only
    assert copies_non_blocking(on_device, copy_cpu=True)
    assert not copies_non_blocking(on_device, copy_cpu=False)  # sync: written right after the copy
    assert not copies_non_blocking(torch.empty(4), copy_cpu=True)
    assert not copies_non_blocking(torch.empty(4), copy_cpu=False)


def test_buffers_report_what_they_hold_and_can_be_freed() -> None:
    buffers = StateBuffers()
    state = {"a": torch.zeros(1000), "b": [torch.zeros(10, dtype=torch.float64)]}
    first = buffers.snapshot(state, ("t",))
    assert buffers.resident_bytes() == 1000 * 4 + 10 * 8
    again = buffers.snapshot(state, ("t",))
    assert again["a"].data_ptr() == first["a"].data_ptr()  # reused between saves
    buffers.release()
    assert buffers.resident_bytes() == 0
    assert buffers.snapshot(state, ("t",))["a"].data_ptr() != 0


@pytest.mark.parametrize("release_buffers", [False, True], ids=["kept", "released"])
def test_release_buffers_frees_the_host_copy_between_saves(tmp_path: Path, release_buffers: bool) -> None:
    weights = {"w": torch.randn(256, 256)}
    with CheckpointManager(
        tmp_path, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min",
        release_buffers=release_buffers,
    ) as manager:  # fmt: skip
        for step in (1, 2):
            weights["w"] += 1
            manager.save(step, model_state=weights, training_state={}, trainer_state={"step": step})
            manager.wait_until_finished()
            held = manager._buffers.resident_bytes()
            if release_buffers:
                assert held == 0
            else:  # the tensor bytes, each file's header page and its last page's rounding
                assert 256 * 256 * 4 < held <= 256 * 256 * 4 + 4 * PAGE_BYTES
            assert torch.equal(load_checkpoint(tmp_path / f"step-{step:06d}").model_state["w"], weights["w"])
