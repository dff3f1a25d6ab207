"""Durable saves and the loop time an async save costs, for the project and each peer, interleaved."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median
from benchmarks.loop_cost import train_steps
from benchmarks.saving import build_state, save_once, state_bytes
from utils.training.engine.checkpoint import CheckpointManager

from .frameworks import ADAPTERS, timed_durable_save


def bench_durable_saves(workdir: Path, state_mib: float, width: int, repeats: int) -> dict[str, Any]:
    """Each framework saves the same model + AdamW state `repeats` times, in rotating order after a
    warm-up save each; a save's folder or file is deleted (outside the timing) before the next."""
    model, optimizer = build_state(state_mib, width)
    adapters = [cls(workdir / cls.__name__.lower(), model, optimizer) for cls in ADAPTERS]
    samples: dict[str, list[dict[str, float]]] = {a.name: [] for a in adapters}
    sizes: dict[str, int] = {}
    step = 1000
    for adapter in adapters:
        sizes[adapter.name] = _size(Path(timed_durable_save(adapter, step)["path"]))
    for r in range(repeats):
        for adapter in adapters[r % len(adapters) :] + adapters[: r % len(adapters)]:
            step += 1
            timing = timed_durable_save(adapter, step)
            samples[adapter.name].append(timing)
            _remove(Path(timing["path"]))
    rows = {}
    for name, timings in samples.items():
        durable = [t["call"] + t["fsync"] for t in timings]
        rows[name] = {
            "durable_seconds": median(durable), "min": min(durable), "max": max(durable),
            "call_seconds": median(t["call"] for t in timings), "added_fsync_seconds": median(t["fsync"] for t in timings),
            "bytes": sizes[name],
        }  # fmt: skip
    return {"state_mib": state_bytes(model, optimizer) / 2**20, "repeats": repeats, "frameworks": rows}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


# -- the loop time an async save costs ------------------------------------------------------
class ProjectAsync:
    name = "training-survives (async)"

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.manager = CheckpointManager(root, keep_last=2, keep_best=0, monitor_metric="v", monitor_mode="min")

    def save(self, step: int) -> None:
        save_once(self.manager, step, self.model, self.optimizer)

    def before_optimizer_step(self) -> None:
        self.manager.wait_for_snapshot()

    def finish(self) -> None:
        self.manager.wait_until_finished()


class DcpAsync:
    name = "DCP async_save"

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.root, self.model, self.optimizer = root, model, optimizer
        self.pending: Future | None = None

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.finish()  # one save in flight, as the project
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        self.pending = dcp.async_save(state, checkpoint_id=str(self.root / f"step-{step}"))

    def before_optimizer_step(self) -> None:
        pass  # async_save stages (copies) the state before it returns

    def finish(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None


class LightningAsync:
    name = "Lightning AsyncCheckpointIO"

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.root, self.model, self.optimizer = root, model, optimizer
        root.mkdir(parents=True, exist_ok=True)
        self.io: Any = None

    def save(self, step: int) -> None:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        if self.io is None:
            self.io = AsyncCheckpointIO(TorchCheckpointIO())
        # What Lightning's dump_checkpoint hands its checkpoint_io: state dicts (cloned by the plugin).
        checkpoint = {"state_dict": self.model.state_dict(), "optimizer_states": [self.optimizer.state_dict()],
                      "global_step": step}  # fmt: skip
        self.io.save_checkpoint(checkpoint, str(self.root / f"step={step}.ckpt"))

    def before_optimizer_step(self) -> None:
        pass

    def finish(self) -> None:
        if self.io is not None:
            self.io.teardown()  # waits for every queued save
            self.io = None


def _loop(model: Any, optimizer: Any, batch: torch.Tensor, steps: int, saver: Any, every: int, saves: int) -> float:
    start = time.perf_counter()
    for s in range(1, steps + 1):
        model(batch).square().mean().backward()
        if saver is not None:
            saver.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if saver is not None and (s - 1) % every == 0 and (s - 1) // every < saves:
            saver.save(s)
    if saver is not None:
        saver.finish()
    return time.perf_counter() - start


def bench_async_loss(
    workdir: Path, state_mib: float, width: int, steps: int, saves: int, repeats: int, batch_rows: int
) -> dict[str, Any]:
    """Loop seconds lost per async save (with saves minus without, equal steps) for the project,
    DCP's async_save and Lightning's AsyncCheckpointIO, interleaved with a plain run each round."""
    model, optimizer = build_state(state_mib, width)
    batch = torch.randn(batch_rows, width)
    every = max(1, steps // saves)
    savers = [cls(workdir / cls.__name__.lower(), model, optimizer) for cls in (ProjectAsync, DcpAsync, LightningAsync)]
    train_steps(model, optimizer, batch, 2)
    for saver in savers:  # warm-up: first allocation, imports, thread pools
        saver.save(0)
        saver.finish()
    lost: dict[str, list[float]] = {s.name: [] for s in savers}
    sync = CheckpointManager(workdir / "sync", keep_last=1, keep_best=0, monitor_metric="v", monitor_mode="min",
                             async_save=False)  # fmt: skip
    sync_seconds = []
    for r in range(repeats):
        order: list[Any] = [None, *savers]  # None: the same loop without saves, in the rotation too
        timed: dict[str, float] = {}
        for saver in order[r % len(order) :] + order[: r % len(order)]:
            name = "without" if saver is None else saver.name
            timed[name] = _loop(model, optimizer, batch, steps, saver, every, saves)
            if saver is not None:
                for old in saver_root(saver).glob("step*"):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        for saver in savers:
            lost[saver.name].append((timed[saver.name] - timed["without"]) / saves)
        start = time.perf_counter()
        save_once(sync, 10_000 + r, model, optimizer)
        sync_seconds.append(time.perf_counter() - start)
    sync_median = median(sync_seconds)
    return {
        "project_sync_save_seconds": sync_median, "steps": steps, "saves": saves, "repeats": repeats,
        "frameworks": {
            name: {"lost_seconds_per_save": median(v), "min": min(v), "max": max(v),
                   "vs_project_sync_save": median(v) / sync_median}
            for name, v in lost.items()
        },
    }  # fmt: skip


def saver_root(saver: Any) -> Path:
    return saver.manager.run_dir if isinstance(saver, ProjectAsync) else saver.root
