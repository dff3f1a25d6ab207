"""Save benchmarks: the loop's stall per async save, a sync save against the raw disk, and a save's peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from utils.training.engine.checkpoint import CheckpointManager, list_checkpoints
from utils.training.engine.commit import CHUNK_BYTES, remove_tree

from .common import (
    entry,
    folder_bytes,
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


def raw_write_seconds(path: Path, payload: memoryview) -> float:
    """Sequential write of `payload` to a new file in CHUNK_BYTES pieces, then fsync."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < len(payload):
            offset += os.write(fd, payload[offset : offset + CHUNK_BYTES])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def bench_save(workdir: Path, state_mib: float, width: int, repeats: int) -> dict[str, dict[str, Any]]:
    """async_stall_ratio and save_vs_disk: async save, sync save and raw write of the same
    bytes, interleaved in rotating order after one warm-up save each."""
    model, optimizer = build_state(state_mib, width)
    n_bytes = state_bytes(model, optimizer)
    managers = {
        mode: CheckpointManager(
            workdir / mode,
            keep_last=0,
            keep_best=0,
            monitor_metric="val/loss",
            monitor_mode="min",
            async_save=mode == "async",
        )  # fmt: skip
        for mode in ("async", "sync")
    }
    step = 1
    start = time.perf_counter()
    save_once(managers["async"], step, model, optimizer)
    first_stall = time.perf_counter() - start  # includes allocating the buffers (first touch)
    managers["async"].wait_until_finished()
    save_once(managers["sync"], step, model, optimizer)
    checkpoint_bytes = folder_bytes(managers["sync"].last_saved_path)
    payload = memoryview(torch.randint(0, 256, (checkpoint_bytes,), dtype=torch.uint8).numpy()).cast("B")
    raw_path = workdir / "raw-write.bin"

    stalls, background, syncs, raws, prunes = [], [], [], [], []
    calls, waits, computes_during, computes_alone = [], [], [], []
    batch = torch.randn(256, width)

    def next_step() -> float:
        """The next training step's forward and backward (what a deferred copy overlaps)."""
        start = time.perf_counter()
        model(batch).square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def prune(manager: CheckpointManager) -> None:
        """Retention, timed apart: deleting the previous checkpoint (freeing its page cache)."""
        start = time.perf_counter()
        for _, old in list_checkpoints(manager.run_dir)[1:]:
            remove_tree(old)
        prunes.append(time.perf_counter() - start)

    for r in range(repeats):
        order = ["async", "sync", "raw", "compute"]
        order = order[r % 4 :] + order[: r % 4]
        for kind in order:
            step += 1
            if kind == "raw":
                raws.append(raw_write_seconds(raw_path, payload))
                continue
            if kind == "compute":
                computes_alone.append(next_step())
                continue
            start = time.perf_counter()
            save_once(managers[kind], step, model, optimizer)
            if kind == "sync":
                syncs.append(time.perf_counter() - start)
            else:
                calls.append(time.perf_counter() - start)
                computes_during.append(next_step())
                wait_start = time.perf_counter()
                managers["async"].wait_for_snapshot()
                waits.append(time.perf_counter() - wait_start)
                # What the loop loses: the call, the wait before its optimizer step, and any
                # slowdown of its forward/backward while the writer thread copies beside it.
                stalls.append(calls[-1] + waits[-1])
                managers["async"].wait_until_finished()
                background.append(time.perf_counter() - start)
            prune(managers[kind])
    for manager in managers.values():
        manager.close()

    slowdown = median(computes_during) - median(computes_alone)
    stall, sync, raw = median(stalls), median(syncs), median(raws)
    mb = checkpoint_bytes / 1e6
    return {
        "async_stall_ratio": entry(
            stall / sync,
            "<=",
            0.05,
            stall_seconds=stall,
            save_call_seconds=median(calls),
            wait_for_snapshot_seconds=median(waits),
            next_step_seconds_alone=median(computes_alone),
            next_step_seconds_during_save=median(computes_during),
            next_step_slowdown_seconds=slowdown,
            sync_save_seconds=sync,
            async_save_total_seconds=median(background),
            first_save_stall_seconds=first_stall,
            retention_delete_seconds=median(prunes),
            state_mib=n_bytes / MIB,
            checkpoint_bytes=checkpoint_bytes,
            stall_samples=stalls,
            sync_samples=syncs,
            repeats=repeats,
            method="stall = time the loop is blocked: manager.save() on the calling thread (state_dict() calls; "
            "the copy into reused CPU buffers runs in the writer thread) + the loop's wait_for_snapshot() after "
            "the next step's forward/backward. The CPU the writer thread takes from that forward/backward is "
            "reported as next_step_slowdown_seconds (with the save in flight minus alone, interleaved) and is "
            "what checkpoint_overhead measures end to end; sync = manager.save() with async_save=False "
            "(write from the live CPU tensors, fsync, manifest, rename); deleting the previous checkpoint "
            "(retention) is timed apart as retention_delete_seconds; medians of interleaved rounds after one "
            "warm-up each",
        ),  # fmt: skip
        "save_vs_disk": entry(
            raw / sync,
            ">=",
            0.8,
            save_mb_per_second=mb / sync,
            raw_write_mb_per_second=mb / raw,
            sync_save_seconds=sync,
            raw_write_seconds=raw,
            checkpoint_bytes=checkpoint_bytes,
            raw_samples=raws,
            repeats=repeats,
            method="ratio = (bytes / sync save seconds) / (bytes / raw seconds); raw = os.write of a "
            "preallocated buffer of the checkpoint's size to a new file in 64 MiB chunks, then fsync",
        ),  # fmt: skip
    }


def rss_probe(state_mib: float, width: int, workdir: str) -> dict[str, Any]:
    """Run in a fresh process: peak RSS of the first and of a later async save, and of the
    naive `torch.save` into a BytesIO of the same training state, each over the RSS before it."""
    import io

    model, optimizer = build_state(state_mib, width)
    n_bytes = state_bytes(model, optimizer)
    manager = CheckpointManager(
        Path(workdir), keep_last=1, keep_best=0, monitor_metric="val/loss", monitor_mode="min", async_save=True
    )
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
            ratio,
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
