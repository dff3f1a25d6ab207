"""Save benchmarks: an async save's stall and its whole cost to the loop, a sync save against the raw disk
doing the same writes, the host memory the snapshot buffers hold, and a save's peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from utils.training.engine.checkpoint import MODEL_FILE, STATE_FILE, TRAINER_FILE, CheckpointManager, list_checkpoints
from utils.training.engine.commit import CHUNK_BYTES, MANIFEST_NAME, remove_tree

from .common import (
    entry,
    median,
    proc_status_kib,
    reset_peak_rss,
)

MIB = 2**20
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_state(state_mib: float, width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A stack of Linear layers and an AdamW that has taken one step, so that weights plus
    the two moments come to about `state_mib` (a real optimizer state, not bare tensors)."""
    params_per_layer = width * width + width
    layers = max(1, round(state_mib * MIB / (12 * params_per_layer)))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for per_param in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in per_param.values() if isinstance(t, torch.Tensor))
    return total


def save_once(manager: CheckpointManager, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What the trainer hands the manager at a checkpoint (state_dict() calls included)."""
    manager.save(
        step,
        model_state=model.state_dict(),
        training_state={"optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}},
        trainer_state={"step": step, "run_name": "bench", "metrics_history": []},
        manifest_fields={"epoch": 0, "reason": "step", "metrics": {}},
    )


def raw_checkpoint_seconds(folder: Path, payloads: dict[str, memoryview]) -> float:
    """The disk's time for the same files with the same fsync pattern and overlap as a save
    (write_checkpoint): the weights file written, its fsync started in a helper thread while the
    training-state file is written and fsynced, then the small JSON files each fsynced, the folder
    fsynced, renamed into place and the parent fsynced. Raw os.write in CHUNK_BYTES pieces: no
    hashing, no serialisation. Returns the seconds; the files are removed afterwards."""
    names = list(payloads)
    tmp, final = folder / ".tmp-raw", folder / "raw"
    start = time.perf_counter()
    tmp.mkdir()
    fd = _write_file(tmp / names[0], payloads[names[0]])
    closer = threading.Thread(target=_fsync_close, args=(fd,))
    closer.start()
    try:
        for name in names[1:]:
            _fsync_close(_write_file(tmp / name, payloads[name]))
    finally:
        closer.join()
    _fsync_path(tmp)
    os.rename(tmp, final)
    _fsync_path(folder)
    seconds = time.perf_counter() - start
    remove_tree(final)
    return seconds


def _write_file(path: Path, payload: memoryview) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    offset = 0
    while offset < len(payload):
        offset += os.write(fd, payload[offset : offset + CHUNK_BYTES])
    return fd


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    _fsync_close(os.open(path, os.O_RDONLY))


def checkpoint_payloads(checkpoint: Path) -> dict[str, memoryview]:
    """Random bytes of each file's size, in the order write_checkpoint writes them."""
    order = [MODEL_FILE, STATE_FILE, TRAINER_FILE, MANIFEST_NAME]
    sizes = {name: (checkpoint / name).stat().st_size for name in order if (checkpoint / name).exists()}
    return {
        name: memoryview(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy()).cast("B")
        for name, size in sizes.items()
    }


def new_manager(run_dir: Path, *, async_save: bool, release_buffers: bool = False) -> CheckpointManager:
    return CheckpointManager(
        run_dir, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min",
        async_save=async_save, release_buffers=release_buffers,
    )  # fmt: skip


def prune_old_checkpoints(manager: CheckpointManager) -> float:
    """Retention, timed apart: deleting the previous checkpoints (freeing their page cache)."""
    start = time.perf_counter()
    for _, old in list_checkpoints(manager.run_dir)[1:]:
        remove_tree(old)
    return time.perf_counter() - start


def timed_sync_save(manager: CheckpointManager, step: int, model: torch.nn.Module, optimizer: Any) -> float:
    start = time.perf_counter()
    save_once(manager, step, model, optimizer)
    return time.perf_counter() - start


def bench_save(workdir: Path, state_mib: float, width: int, repeats: int) -> dict[str, dict[str, Any]]:
    """async_stall_ratio and save_vs_disk: async save, sync save and the raw disk doing the same
    writes, interleaved in rotating order after one warm-up save each; one paired ratio per round."""
    model, optimizer = build_state(state_mib, width)
    n_bytes = state_bytes(model, optimizer)
    managers = {
        "async": new_manager(workdir / "async", async_save=True),
        "sync": new_manager(workdir / "sync", async_save=False),
    }
    step = 1
    start = time.perf_counter()
    save_once(managers["async"], step, model, optimizer)
    first_stall = time.perf_counter() - start  # includes allocating the buffers (first touch)
    managers["async"].wait_until_finished()
    save_once(managers["sync"], step, model, optimizer)
    payloads = checkpoint_payloads(managers["sync"].last_saved_path)
    checkpoint_bytes = sum(len(p) for p in payloads.values())
    raw_dir = workdir / "raw"
    raw_dir.mkdir()
    batch = torch.randn(256, width)

    def next_step() -> float:
        """The next training step's forward and backward (what a deferred copy overlaps)."""
        start = time.perf_counter()
        model(batch).square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    rounds: list[dict[str, float]] = []
    prunes = []
    for r in range(repeats):
        got: dict[str, float] = {}
        order = ["async", "sync", "raw", "compute"]
        for kind in order[r % 4 :] + order[: r % 4]:
            step += 1
            os.sync()  # untimed: no write-back left over from the item before (deleted folders, journal)
            if kind == "raw":
                got["raw"] = raw_checkpoint_seconds(raw_dir, payloads)
            elif kind == "compute":
                got["compute_alone"] = next_step()
            elif kind == "sync":
                got["sync"] = timed_sync_save(managers["sync"], step, model, optimizer)
            else:
                start = time.perf_counter()
                save_once(managers["async"], step, model, optimizer)
                got["call"] = time.perf_counter() - start
                got["compute_during"] = next_step()
                wait_start = time.perf_counter()
                managers["async"].wait_for_snapshot()
                got["wait"] = time.perf_counter() - wait_start
                managers["async"].wait_until_finished()
                got["async_total"] = time.perf_counter() - start
            if kind in managers:
                prunes.append(prune_old_checkpoints(managers[kind]))
        rounds.append(got)
    for manager in managers.values():
        manager.close()
    return _save_entries(rounds, prunes, first_stall, n_bytes, checkpoint_bytes, repeats)


def _save_entries(
    rounds: list[dict[str, float]],
    prunes: list[float],
    first_stall: float,
    n_bytes: int,
    checkpoint_bytes: int,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    def col(name: str) -> list[float]:
        return [r[name] for r in rounds]

    stalls = [r["call"] + r["wait"] for r in rounds]
    sync, raw = median(col("sync")), median(col("raw"))
    mb = checkpoint_bytes / 1e6
    return {
        "async_stall_ratio": entry(
            [(r["call"] + r["wait"]) / r["sync"] for r in rounds],
            "<=",
            0.05,
            stall_seconds=median(stalls),
            save_call_seconds=median(col("call")),
            wait_for_snapshot_seconds=median(col("wait")),
            next_step_seconds_alone=median(col("compute_alone")),
            next_step_seconds_during_save=median(col("compute_during")),
            next_step_slowdown_seconds=median(col("compute_during")) - median(col("compute_alone")),
            sync_save_seconds=sync,
            async_save_total_seconds=median(col("async_total")),
            first_save_stall_seconds=first_stall,
            retention_delete_seconds=median(prunes),
            state_mib=n_bytes / MIB,
            checkpoint_bytes=checkpoint_bytes,
            stall_samples=stalls,
            sync_samples=col("sync"),
            repeats=repeats,
            method="per round: stall / sync save. stall = time the loop is blocked: manager.save() on the calling "
            "thread (state_dict() calls; the copy into reused CPU buffers runs in the writer thread) + the loop's "
            "wait_for_snapshot() after the next step's forward/backward; sync = manager.save() with "
            "async_save=False. What the writer thread takes from the following steps is not in this figure: "
            "async_loop_cost_ratio measures it",
        ),  # fmt: skip
        "save_vs_disk": entry(
            [r["raw"] / r["sync"] for r in rounds],
            ">=",
            0.8,
            physical_limit=1.0,
            save_mb_per_second=mb / sync,
            raw_write_mb_per_second=mb / raw,
            sync_save_seconds=sync,
            raw_write_seconds=raw,
            checkpoint_bytes=checkpoint_bytes,
            raw_samples=col("raw"),
            repeats=repeats,
            method="per round: raw seconds / sync save seconds, each started after an untimed os.sync(). raw = "
            "the same files (random bytes of each "
            "file's size) written with os.write in 64 MiB chunks with the save's fsync pattern and overlap: the "
            "weights file's fsync in a helper thread while the training state is written and fsynced, then "
            "trainer_state.json and MANIFEST.json each fsynced, the folder fsynced, renamed, the parent fsynced",
        ),  # fmt: skip
    }


def rss_probe(state_mib: float, width: int, workdir: str) -> dict[str, Any]:
    """Run in a fresh process: peak RSS of the first and of a later async save, and of the
    naive `torch.save` into a BytesIO of the same training state, each over the RSS before it."""
    import io

    model, optimizer = build_state(state_mib, width)
    n_bytes = state_bytes(model, optimizer)
    manager = new_manager(Path(workdir), async_save=True)
    extra: dict[str, float] = {}
    can_reset = True
    for step, label in ((1, "first_save"), (2, "later_save")):
        before = proc_status_kib("VmRSS") or 0
        can_reset = reset_peak_rss() and can_reset
        save_once(manager, step, model, optimizer)
        manager.wait_until_finished()
        extra[label] = ((proc_status_kib("VmHWM") or 0) - before) * 1024
    manager.close()
    before = proc_status_kib("VmRSS") or 0
    can_reset = reset_peak_rss() and can_reset
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict()}, buffer)
    extra["bytesio_torch_save"] = ((proc_status_kib("VmHWM") or 0) - before) * 1024
    del buffer
    return {"state_bytes": n_bytes, "extra_bytes": extra, "peak_reset_worked": can_reset}


def bench_save_peak_rss(workdir: Path, state_mib: float, width: int) -> dict[str, dict[str, Any]]:
    """save_peak_rss_ratio: measured in a child process so that nothing else touches its peak."""
    workdir.mkdir(parents=True, exist_ok=True)
    code = (
        "import json, sys, torch; torch.set_num_threads(1); from benchmarks.saving import rss_probe; "
        f"print(json.dumps(rss_probe({state_mib!r}, {width!r}, {str(workdir)!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the peak-RSS probe failed: {done.stderr.strip().splitlines()[-1:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    n_bytes = probe["state_bytes"]
    extra = probe["extra_bytes"]
    ratio = extra["first_save"] / n_bytes
    return {
        "save_peak_rss_ratio": entry(
            [ratio],
            "<=",
            1.1,
            peak_extra_mib=extra["first_save"] / MIB,
            state_mib=n_bytes / MIB,
            later_save_extra_ratio=extra["later_save"] / n_bytes,
            bytesio_torch_save_extra_ratio=extra["bytesio_torch_save"] / n_bytes,
            peak_reset_worked=probe["peak_reset_worked"],
            method="(VmHWM during the first async save, write included - VmRSS before it) / bytes of weights "
            "and optimizer moments; the first save allocates the reusable CPU buffers (1.0x is that copy); "
            "later_save_extra_ratio is the same for a later save; bytesio_torch_save_extra_ratio is the "
            "old way (torch.save of the optimizer state into a BytesIO) for comparison",
        ),  # fmt: skip
    }
