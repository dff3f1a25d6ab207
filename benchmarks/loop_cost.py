"""The async save's whole cost to the loop (async_loop_cost_ratio) and the host memory its snapshot
buffers hold between saves (save_resident_ratio), with the cost of releasing them after each save."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from utils.training.engine.checkpoint import CheckpointManager
from utils.training.engine.checkpoint_index import step_dir_name
from utils.training.engine.commit import fsync_dir, remove_tree
from utils.training.engine.snapshot import FilledFile, FilledFileWriter, page_aligned_buffer

from .common import entry, median
from .saving import (
    MIB,
    build_state,
    checkpoint_payloads,
    new_manager,
    prune_old_checkpoints,
    save_once,
    state_bytes,
    timed_sync_save,
)


class RawDiskWrites:
    """The disk's own share of an async save, in the place of one: the same files' bytes, from
    page-aligned buffers filled once, written by the async writer's own FilledFileWriter (O_DIRECT
    where accepted, fsync each file) one file after the other, then the folders fsynced, in a thread
    started where a save starts and joined where the loop waits for one. No copy of the state, no
    hash, no manifest: the loop time it costs is what writing those bytes durably costs any saver.
    In a folder on a tmpfs the same writes are copies into memory: what the bytes cost without a disk."""

    def __init__(self, folder: Path, payloads: dict[str, memoryview]) -> None:
        self.run_dir = folder
        folder.mkdir(parents=True)
        self._images: dict[str, FilledFile] = {}
        for name, payload in payloads.items():
            image = page_aligned_buffer(len(payload))
            image[: len(payload)] = payload
            self._images[name] = FilledFile(data=memoryview(image)[: len(payload)], size_bytes=len(payload), hash="")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, **_: Any) -> None:
        self._thread = threading.Thread(target=self._write, args=(self.run_dir / step_dir_name(step),))
        self._thread.start()

    def _write(self, target: Path) -> None:
        try:
            target.mkdir()
            for name, image in self._images.items():
                writer = FilledFileWriter(target / name, image)
                writer.write_all()
                writer.close()
            fsync_dir(target)
            fsync_dir(self.run_dir)
        except BaseException as exc:  # raised in the loop's thread by wait_until_finished
            self._error = exc

    def wait_for_snapshot(self) -> None:
        """Nothing to wait for: the bytes written are not the live state."""

    def wait_until_finished(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            remove_tree(self.run_dir)


def memory_folder(n_bytes: int) -> Path | None:
    """A tmpfs folder with room for two copies of `n_bytes` (/dev/shm on Linux), or None."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 2 * n_bytes:
            return Path(tempfile.mkdtemp(prefix="bench-loop-cost-", dir=shm))
    except OSError:
        pass
    return None


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    steps: int,
    manager: CheckpointManager | RawDiskWrites | None = None,
    save_every: int = 0,
    first_step: int = 0,
    saves: int = 0,
) -> float:
    """Seconds for `steps` training steps; with a manager, `saves` saves, after steps 1, 1 + save_every,
    ... (the last one `save_every` steps before the end). The wait for the last save to finish is
    inside the timed loop: everything a save costs the loop is counted."""
    start = time.perf_counter()
    for s in range(1, steps + 1):
        model(batch).square().mean().backward()
        if manager is not None:
            manager.wait_for_snapshot()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if manager is not None and (s - 1) % save_every == 0 and (s - 1) // save_every < saves:
            save_once(manager, first_step + s, model, optimizer)
    if manager is not None:
        manager.wait_until_finished()
    return time.perf_counter() - start


def bench_async_loop(
    workdir: Path, state_mib: float, width: int, steps: int, saves: int, repeats: int, batch_rows: int
) -> dict[str, dict[str, Any]]:
    """async_loop_cost_ratio and save_resident_ratio: the same loop (equal step counts) without saves,
    with async saves, with async saves that release their buffers, and with the raw disk writing the
    same bytes in the place of each save, plus a sync save, interleaved.

    A round's `steps` are cut into `saves` pieces of `every` steps per kind, run in rotating order
    (a piece without saves, one with one async save, one with one save that releases its buffers,
    one with the raw disk writes), so that the sides of a pair run a fraction of a second apart,
    under the same load."""
    model, optimizer = build_state(state_mib, width)
    n_bytes = state_bytes(model, optimizer)
    batch = torch.randn(batch_rows, width)
    every = max(1, steps // saves)
    managers = {
        "with_saves": new_manager(workdir / "kept", async_save=True),
        "released": new_manager(workdir / "released", async_save=True, release_buffers=True),
        "sync": new_manager(workdir / "sync", async_save=False),
    }
    train_steps(model, optimizer, batch, 2)  # warm-up: first-touch of gradients and moments
    for manager in managers.values():  # warm-up save each: buffers allocated, folders created
        save_once(manager, 0, model, optimizer)
        manager.wait_until_finished()
    payloads = checkpoint_payloads(managers["sync"].last_saved_path)
    raw_disk = RawDiskWrites(workdir / "raw-disk", payloads)
    savers: dict[str, CheckpointManager | RawDiskWrites] = {**managers, "raw_disk": raw_disk}
    memory = memory_folder(n_bytes)
    if memory is not None:  # the same writes into a tmpfs: the bytes' copy, no disk
        savers["raw_memory"] = RawDiskWrites(memory / "raw-memory", payloads)
        free_memory = weakref.finalize(savers["raw_memory"], remove_tree, memory)  # also when a round fails
    rounds: list[dict[str, float]] = []
    per_save: list[float] = []
    cpu_per_save: list[tuple[float, float]] = []  # (the loop thread's CPU, the whole process's CPU)
    resident = managers["with_saves"]._buffers.resident_bytes()
    step = 1
    kinds = ["without", "with_saves", "released", "raw_disk"] + (["raw_memory"] if memory is not None else [])
    for r in range(repeats):
        got = dict.fromkeys(kinds, 0.0)
        for piece in range(saves + 1):
            if piece == r % (saves + 1):  # the sync save at a rotating place in the round
                step += 1
                got["sync"] = timed_sync_save(managers["sync"], step, model, optimizer)
                prune_old_checkpoints(managers["sync"])
            if piece == saves:
                break
            seconds, cpu = {}, {}
            for kind in kinds[(r + piece) % len(kinds) :] + kinds[: (r + piece) % len(kinds)]:
                step += 1  # every save under a step of its own: a verified checkpoint is never replaced
                manager = savers.get(kind)
                thread_cpu, process_cpu = time.thread_time(), time.process_time()
                seconds[kind] = train_steps(model, optimizer, batch, every, manager, every, step * 1000, 1)
                cpu[kind] = (time.thread_time() - thread_cpu, time.process_time() - process_cpu)
                if manager is not None:
                    prune_old_checkpoints(manager)
                got[kind] += seconds[kind]
            per_save.append(seconds["with_saves"] - seconds["without"])
            cpu_per_save.append((cpu["with_saves"][0] - cpu["without"][0], cpu["with_saves"][1] - cpu["without"][1]))
        rounds.append(got)
    released_resident = managers["released"]._buffers.resident_bytes()
    for saver in savers.values():
        saver.close()
    if memory is not None:
        free_memory()
    return _loop_cost_entries(rounds, saves, every * saves, every, n_bytes, resident, released_resident, repeats,
                              per_save, cpu_per_save, memory)  # fmt: skip


def _loop_cost_entries(
    rounds: list[dict[str, float]],
    n_saves: int,
    steps: int,
    every: int,
    n_bytes: int,
    resident: int,
    released_resident: int,
    repeats: int,
    per_save: list[float],
    cpu_per_save: list[tuple[float, float]],
    memory: Path | None,
) -> dict[str, dict[str, Any]]:
    def lost_per_save(kind: str) -> list[float]:
        return [(r[kind] - r["without"]) / n_saves for r in rounds]

    def ratios(kind: str) -> list[float]:
        return [(r[kind] - r["without"]) / n_saves / r["sync"] for r in rounds]

    sync = median(r["sync"] for r in rounds)
    common = {"steps_per_run": steps, "saves_per_run": n_saves, "save_every_steps": every, "repeats": repeats,
              "state_mib": n_bytes / MIB}  # fmt: skip
    return {
        "async_loop_cost_ratio": entry(
            ratios("with_saves"),
            "<=",
            0.10,
            loop_seconds_lost_per_save=median(lost_per_save("with_saves")),
            sync_save_seconds=sync,
            loop_seconds_without_saves=median(r["without"] for r in rounds),
            loop_seconds_with_saves=median(r["with_saves"] for r in rounds),
            lost_per_save_samples=lost_per_save("with_saves"),
            windowed_seconds_lost_per_save=median(per_save),
            windowed_seconds_lost_per_save_min=min(per_save),
            windowed_seconds_lost_per_save_max=max(per_save),
            windowed_loop_cost_ratio=median(per_save) / sync,
            raw_disk_loop_cost_ratio=median(ratios("raw_disk")),
            raw_disk_seconds_lost_per_save=median(lost_per_save("raw_disk")),
            beyond_raw_disk_loop_cost_ratio=median(
                (r["with_saves"] - r["raw_disk"]) / n_saves / r["sync"] for r in rounds
            ),
            raw_memory_loop_cost_ratio=median(ratios("raw_memory")) if memory is not None else None,
            raw_memory_seconds_lost_per_save=median(lost_per_save("raw_memory")) if memory is not None else None,
            raw_memory_folder=str(memory) if memory is not None else None,
            loop_thread_cpu_seconds_lost_per_save=median(c[0] for c in cpu_per_save),
            process_cpu_seconds_per_save=median(c[1] for c in cpu_per_save),
            **common,
            method="per round: (loop seconds with async saves - the same loop without, equal step counts) / saves "
            "/ a sync save's seconds in that round. The loop: forward, backward, wait_for_snapshot, AdamW step "
            "over the saved Linear stack. A round's steps run in pieces of save_every_steps, rotating: a piece "
            "without saves, the same piece with one async save (after its first step; the wait for it to finish "
            "inside the piece, so the stall and the writer thread's CPU and GIL taken from the following steps "
            "all count), the same with release_buffers, the same with RawDiskWrites in the place of the save (the "
            "same bytes written as the async writer writes them, nothing copied or hashed: raw_disk_* is what the "
            "disk itself costs the loop, beyond_raw_disk_* what the save adds to it), and where a tmpfs has room "
            "the same RawDiskWrites into it (raw_memory_*: the same bytes copied into memory, no disk: what they "
            "cost the loop without one); the sync save at a rotating place. windowed_*: a "
            "cross-check, not the verdict: per save, its piece less the piece without saves beside it, median "
            "over every save of every round. loop_thread_cpu_seconds_lost_per_save and "
            "process_cpu_seconds_per_save: the same difference in CPU seconds of the loop's thread (memory "
            "bandwidth and cache the writer takes from it; not the time other programs take) and of the whole "
            "process (the writer thread's CPU included): figures that load elsewhere on the machine barely moves",
        ),  # fmt: skip
        "save_resident_ratio": entry(
            [resident / n_bytes],
            "<=",
            1.1,
            resident_mib=resident / MIB,
            released_resident_mib=released_resident / MIB,
            release_buffers_loop_cost_ratio=median(ratios("released")),
            release_buffers_loop_cost_ratio_min=min(ratios("released")),
            release_buffers_loop_cost_ratio_max=max(ratios("released")),
            release_buffers_extra_seconds_per_save=median((r["released"] - r["with_saves"]) / n_saves for r in rounds),
            **common,
            method="host memory the reused snapshot buffers hold between saves / bytes of weights and optimizer "
            "moments (one full copy: 1.0). CheckpointManager(release_buffers=True) frees them after each save: "
            "released_resident_mib is then what stays, and release_buffers_loop_cost_ratio its loop cost, "
            "measured like async_loop_cost_ratio in the same rounds",
        ),  # fmt: skip
    }
