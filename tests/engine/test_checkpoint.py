"""Tests for checkpoints: the format, the manager (sync and async), retention, verify, killed saves."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from utils.training.engine.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    TRAINER_FILE,
    CheckpointManager,
    apply_retention,
    latest_valid_checkpoint,
    list_checkpoints,
    list_leftovers,
    load_checkpoint,
    read_model_file,
    read_training_state,
)
from utils.training.engine.commit import MANIFEST_NAME, CheckpointCorrupt, CheckpointWriteError, verify
from utils.training.engine.model import ByteTransformer
from utils.training.engine.recovery import recover
from utils.training.engine.reproducibility import rng_state, set_rng_state


def _model_and_optimizer(seed: int = 0) -> tuple[ByteTransformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = ByteTransformer(n_layer=1, n_head=2, n_embd=16, context_length=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 256, (2, 9))
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
    optimizer.step()  # so the optimizer has state (exp_avg, exp_avg_sq, step) to save
    return model, optimizer


def _state(model: ByteTransformer, optimizer: torch.optim.Optimizer, step: int, **extra: Any) -> dict[str, Any]:
    return dict(
        model_state=model.state_dict(),
        training_state={"optimizer": optimizer.state_dict(), "rng": rng_state(), "data": {"position": step, "seed": 1}},
        trainer_state={"run_name": "r", "run_id": 1, "step": step, "epoch": step, "metrics_history": [], **extra},
    )


def _manager(run_dir: Path, *, async_save: bool, keep_last: int = 0, keep_best: int = 1, mode: str = "min"):
    return CheckpointManager(
        run_dir, keep_last=keep_last, keep_best=keep_best, monitor_metric="val/loss", monitor_mode=mode,
        async_save=async_save,
    )  # fmt: skip


def _assert_nested_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_and_load_round_trip(tmp_path: Path, async_save: bool):
    model, optimizer = _model_and_optimizer()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    saved = _state(model, optimizer, 7, best={"value": 1.5, "checkpoint": "step-000007"}, note="ünïcode")
    draws = (random.random(), float(np.random.rand()), torch.rand(3))  # what the saved RNG states give next
    expected = json.loads(json.dumps(saved["training_state"]["data"]))
    with _manager(tmp_path / "run", async_save=async_save) as manager:
        manager.save(7, **saved, manifest_fields={"epoch": 7, "metrics": {"val/loss": 1.5}})
    path = tmp_path / "run" / "step-000007"
    assert manager.last_saved_path == path and manager.saves_completed == 1

    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.path == path
    _assert_nested_equal(model.state_dict(), loaded.model_state, "model")
    assert loaded.model_state["head.weight"].data_ptr() == loaded.model_state["tok_emb.weight"].data_ptr()
    _assert_nested_equal(optimizer.state_dict(), loaded.training_state["optimizer"], "optimizer")
    _assert_nested_equal(saved["training_state"]["rng"], loaded.training_state["rng"], "rng")
    assert loaded.training_state["data"] == expected
    assert loaded.trainer_state == json.loads(json.dumps(saved["trainer_state"]))
    assert loaded.manifest["epoch"] == 7 and loaded.manifest["metrics"] == {"val/loss": 1.5}

    # The loaded state restores a working model, optimizer and the RNG streams.
    fresh, fresh_opt = _model_and_optimizer(seed=99)
    fresh.load_state_dict(loaded.model_state)
    fresh_opt.load_state_dict(loaded.training_state["optimizer"])
    _assert_nested_equal(optimizer.state_dict(), fresh_opt.state_dict(), "reloaded optimizer")
    set_rng_state(loaded.training_state["rng"])
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_an_async_save_keeps_the_state_of_the_moment_it_was_called(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manager = _manager(tmp_path / "run", async_save=True)
    manager.save(1, **_state(model, optimizer, 1))
    manager.wait_for_snapshot()  # as the loop does before its optimizer step: the copy is taken
    with torch.no_grad():  # training goes on while the writer thread works
        for p in model.parameters():
            p.add_(1.0)
    manager.wait_until_finished()
    _assert_nested_equal(before, load_checkpoint(tmp_path / "run" / "step-000001").model_state)


def test_the_manifest_lists_every_file_with_its_size_and_hash(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    with _manager(tmp_path, async_save=False) as manager:
        manager.save(3, **_state(model, optimizer, 3))
    folder = tmp_path / "step-000003"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {MODEL_FILE, STATE_FILE, TRAINER_FILE}
    assert {p.name for p in folder.iterdir()} == {MODEL_FILE, STATE_FILE, TRAINER_FILE, MANIFEST_NAME}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry["size_bytes"] == len(data)
        assert entry["hash"] == xxhash.xxh3_128(data).hexdigest()
    assert manifest["step"] == 3
    newest_file = max((folder / n).stat().st_mtime_ns for n in manifest["files"])
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns >= newest_file


def test_the_weights_are_a_standard_safetensors_file_with_tied_weights_stored_once(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    with _manager(tmp_path, async_save=False) as manager:
        manager.save(1, **_state(model, optimizer, 1))
    path = tmp_path / "step-000001" / MODEL_FILE
    tensors = load_file(str(path))  # the reference reader, not ours
    state = model.state_dict()
    assert "head.weight" not in tensors  # the tied output layer is the embedding: stored once
    assert set(tensors) == set(state) - {"head.weight"}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, state[name]), name
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["aliases"]) == {"head.weight": "tok_emb.weight"}
    embedding_bytes = state["tok_emb.weight"].numel() * 4
    total_bytes = sum(t.numel() * 4 for t in tensors.values())
    assert path.stat().st_size < total_bytes + embedding_bytes  # not stored twice
    ours = read_model_file(path)
    assert torch.equal(ours["head.weight"], state["head.weight"])


@pytest.mark.parametrize("aliases", ['{"head.weight": "missing"}', "[1]"], ids=["unknown target", "not an object"])
def test_a_weights_file_with_bad_aliases_is_reported_as_corrupt(tmp_path: Path, aliases: str):
    from safetensors.torch import save_file

    path = tmp_path / MODEL_FILE
    save_file({"w": torch.zeros(2)}, str(path), metadata={"aliases": aliases})
    with pytest.raises(CheckpointCorrupt, match=str(path)):
        read_model_file(path)


def test_training_state_is_plain_safetensors_and_loads_back(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    with _manager(tmp_path, async_save=False) as manager:
        manager.save(1, **_state(model, optimizer, 1))
    assert load_file(str(tmp_path / "step-000001" / STATE_FILE))  # any safetensors reader takes it: no pickle
    state = read_training_state(tmp_path / "step-000001" / STATE_FILE)
    assert set(state) == {"optimizer", "rng", "data"}
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_load_catches_a_changed_byte_and_names_the_file(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    with _manager(tmp_path, async_save=False) as manager:
        manager.save(1, **_state(model, optimizer, 1))
    path = tmp_path / "step-000001" / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside a weight: the file still parses
    path.write_bytes(bytes(data))
    load_file(str(path))
    with pytest.raises(CheckpointCorrupt, match="does not match its hash") as info:
        load_checkpoint(path.parent)
    assert info.value.path == str(path)
    with pytest.raises(CheckpointCorrupt):
        verify(path.parent)


def test_latest_valid_checkpoint_passes_over_a_damaged_newest(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    with _manager(tmp_path, async_save=False) as manager:
        for step in (1, 2):
            manager.save(step, **_state(model, optimizer, step))
    damaged = tmp_path / "step-000002" / STATE_FILE
    damaged.write_bytes(b"\x00" * damaged.stat().st_size)
    path, skipped = latest_valid_checkpoint(tmp_path)
    assert path == tmp_path / "step-000001"
    assert skipped == [{"path": str(tmp_path / "step-000002"), "reason": skipped[0]["reason"]}]
    assert "hash" in skipped[0]["reason"]
    assert latest_valid_checkpoint(tmp_path, full=False)[0] == tmp_path / "step-000002"  # same sizes


def _save_with_metrics(run_dir: Path, losses: list[float | None], **kwargs: Any) -> None:
    model, optimizer = _model_and_optimizer()
    with _manager(run_dir, async_save=False, **kwargs) as manager:
        for step, loss in enumerate(losses, start=1):
            metrics = {} if loss is None else {"val/loss": loss}
            manager.save(step, **_state(model, optimizer, step), manifest_fields={"metrics": metrics})


def _steps(run_dir: Path) -> list[int]:
    return sorted(step for step, _ in list_checkpoints(run_dir))


def test_retention_keeps_the_newest_and_the_best(tmp_path: Path):
    _save_with_metrics(tmp_path, [3.0, 1.0, 4.0, 5.0, 6.0], keep_last=2, keep_best=1)
    assert _steps(tmp_path) == [2, 4, 5]
    for _, path in list_checkpoints(tmp_path):
        verify(path)


def test_retention_follows_the_monitor_mode(tmp_path: Path):
    _save_with_metrics(tmp_path, [3.0, 9.0, 4.0, 5.0, 6.0], keep_last=1, keep_best=1, mode="max")
    assert _steps(tmp_path) == [2, 5]


def test_retention_never_deletes_the_newest_or_the_best_even_when_asked_to_keep_none(tmp_path: Path):
    _save_with_metrics(tmp_path, [2.0, 0.5, 3.0, None], keep_last=1, keep_best=0)
    assert _steps(tmp_path) == [2, 4]  # step 4 is newest (no metric: mid-epoch), step 2 the best


def test_keep_last_0_keeps_every_checkpoint(tmp_path: Path):
    _save_with_metrics(tmp_path, [3.0, 1.0, 4.0, 5.0, 6.0], keep_last=0, keep_best=0)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5]


def test_retention_leaves_damaged_folders_for_a_person(tmp_path: Path):
    _save_with_metrics(tmp_path, [3.0, 1.0, 4.0], keep_last=0)
    (tmp_path / "step-000001" / MANIFEST_NAME).unlink()
    deleted = apply_retention(tmp_path, keep_last=1, keep_best=1, monitor_metric="val/loss", monitor_mode="min")
    assert deleted == []  # step 3 newest, step 2 best; step 1 is not a checkpoint: not ours to delete
    assert _steps(tmp_path) == [1, 2, 3]


def test_an_async_writer_error_surfaces_on_the_next_check(tmp_path: Path):
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run folder should be")
    model, optimizer = _model_and_optimizer()
    manager = _manager(blocked, async_save=True)
    manager.save(1, **_state(model, optimizer, 1))  # returns at once; the writer thread fails
    with pytest.raises(CheckpointWriteError) as info:
        manager.wait_until_finished()
    assert "step-000001" in info.value.path and "previous checkpoints are intact" in str(info.value)
    manager.check()  # raised once, not again
    manager.close()
    assert blocked.read_text() == "a file where the run folder should be"


def test_an_async_writer_error_is_raised_by_check_and_leaves_earlier_checkpoints_alone(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    manager = _manager(tmp_path, async_save=True)
    manager.save(1, **_state(model, optimizer, 1))
    manager.wait_until_finished()
    bad = _state(model, optimizer, 2)
    bad["model_state"] = {**bad["model_state"], "extra": torch.zeros(2, dtype=torch.complex64)}
    manager.save(2, **bad)
    deadline = time.monotonic() + 30
    while manager.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(TypeError, match="complex64"):
        manager.check()
    manager.check()
    assert _steps(tmp_path) == [1] and list_leftovers(tmp_path) == []
    verify(tmp_path / "step-000001")
    manager.close()


def test_the_error_of_a_background_save_is_raised_by_the_next_check(tmp_path: Path):
    """Issue 10 item 4: the next save() hands its state to a writer first (a failed save never
    drops the next one); the earlier failure surfaces at check(), once, in order."""
    blocked = tmp_path / "run"
    blocked.write_text("x")
    model, optimizer = _model_and_optimizer()
    manager = _manager(blocked, async_save=True)
    manager.save(1, **_state(model, optimizer, 1))
    manager.save(2, **_state(model, optimizer, 2))
    with pytest.raises(CheckpointWriteError, match="step-000001"):
        manager.check()
    manager.wait_for_snapshot()
    with pytest.raises(CheckpointWriteError, match="step-000002"):
        manager.wait_until_finished()
    manager.close(raise_errors=False)


def test_a_sync_save_raises_at_once(tmp_path: Path):
    blocked = tmp_path / "run"
    blocked.write_text("x")
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointWriteError):
        _manager(blocked, async_save=False).save(1, **_state(model, optimizer, 1))


# -- a save killed with SIGKILL --------------------------------------------------------------
def _save_in_child_killed_at(run_dir: Path, state: dict[str, Any], kill_at: int) -> bool:
    """Fork a process that saves step 2 and SIGKILL it at its `kill_at`-th fsync boundary
    (just before or just after each fsync the commit protocol makes). Returns False when
    the save finished before reaching that point."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            real_fsync, events = os.fsync, [0]

            def boundary() -> None:
                events[0] += 1
                if events[0] == kill_at:
                    os.write(write_end, b"k")
                    time.sleep(60)  # the parent kills us here

            def fsync(fd: int) -> None:
                boundary()
                real_fsync(fd)
                boundary()

            os.fsync = fsync
            _manager(run_dir, async_save=False).save(2, **state, manifest_fields={"epoch": 2})
            os.write(write_end, b"d")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 120)
        message = os.read(read_end, 1) if ready else b"timeout"
        if message in (b"k", b"timeout"):
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert message in (b"k", b"d"), "the child failed before its kill point"
    if message == b"k":
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return message == b"k"


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")
def test_a_save_killed_at_any_point_never_leaves_what_recovery_takes_as_a_checkpoint(tmp_path: Path):
    model, optimizer = _model_and_optimizer()
    template = tmp_path / "template" / "checkpoints" / "r"
    with _manager(template, async_save=False) as manager:
        manager.save(1, **_state(model, optimizer, 1))
    state = _state(model, optimizer, 2)
    outcomes = {"left a temp folder": 0, "committed": 0, "nothing yet": 0}
    kill_at = 0
    while True:
        kill_at += 1
        assert kill_at < 100, "the save never finished"
        run_dir = tmp_path / f"kill-{kill_at}" / "checkpoints" / "r"
        shutil.copytree(template, run_dir)
        if not _save_in_child_killed_at(run_dir, state, kill_at):
            break
        results = recover(run_dir, search_dirs=[])
        taken = Path(results["checkpoint_path"])
        verify(taken)  # whatever recovery takes is whole, every hash
        load_checkpoint(taken)
        leftovers = list_leftovers(run_dir)
        assert taken.name in ("step-000001", "step-000002")
        if taken.name == "step-000002":
            outcomes["committed"] += 1
        else:
            assert not (run_dir / "step-000002").exists()
            outcomes["left a temp folder" if leftovers else "nothing yet"] += 1
        skipped_paths = {s["path"] for s in results["skipped"]}
        assert {str(p) for p in leftovers} <= skipped_paths
    # the points covered both sides of the rename: partial saves and finished ones
    assert outcomes["left a temp folder"] >= 4 and outcomes["committed"] >= 1, outcomes
