"""The async save's whole cost to the loop (async_loop_cost_ratio) and the host memory its snapshot
buffers hold between saves (save_resident_ratio), with the cost of releasing them after each save."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from utils.training.engine.checkpoint import CheckpointManager

from .common import entry, median
from .saving import (
    MIB,
    build_state,
    new_manager,
    prune_old_checkpoints,
    save_once,
    state_bytes,
    timed_sync_save,
)


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    steps: int,
    manager: CheckpointManager | None = None,
    save_every: int = 0,
    first_step: int = 0,
    saves: int = 0,
    step_seconds: list[float] | None = None,
) -> float:
    """Seconds for `steps` training steps; with a manager, `saves` saves, after steps 1, 1 + save_every,
    ... (the last one `save_every` steps before the end). The wait for the last save to finish is
    inside the timed loop: everything a save costs the loop is counted. `step_seconds` receives each
    step's seconds (the save call in its step, the final wait in the last one)."""
    start = previous = time.perf_counter()
    for s in range(1, steps + 1):
        model(batch).square().mean().backward()
        if manager is not None:
            manager.wait_for_snapshot()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if manager is not None and (s - 1) % save_every == 0 and (s - 1) // save_every < saves:
            save_once(manager, first_step + s, model, optimizer)
        if manager is not None and s == steps:
            manager.wait_until_finished()
        if step_seconds is not None:
            now = time.perf_counter()
            step_seconds.append(now - previous)
            previous = now
    return time.perf_counter() - start


def windowed_losses(with_steps: list[float], without_steps: list[float], every: int, saves: int) -> list[float]:
    """Per save: the seconds of the `every` steps from it to the next save, less the same steps of the
    same round's loop without saves. The median over many saves shrugs off a burst of load elsewhere
    that hits a few windows, where one segment's sum cannot."""
    return [sum(with_steps[i * every : (i + 1) * every]) - sum(without_steps[i * every : (i + 1) * every])
            for i in range(saves)]  # fmt: skip


def bench_async_loop(
    workdir: Path, state_mib: float, width: int, steps: int, saves: int, repeats: int, batch_rows: int
) -> dict[str, dict[str, Any]]:
    """async_loop_cost_ratio and save_resident_ratio: the same loop (equal step counts) without saves,
    with async saves, and with async saves that release their buffers, plus a sync save, interleaved."""
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
    rounds: list[dict[str, float]] = []
    windowed: list[float] = []
    resident = managers["with_saves"]._buffers.resident_bytes()
    step = 1
    for r in range(repeats):
        got: dict[str, float] = {}
        per_step: dict[str, list[float]] = {"without": [], "with_saves": []}
        order = ["without", "with_saves", "released", "sync"]
        for kind in order[r % 4 :] + order[: r % 4]:
            step += 1  # every run saves under steps of its own: a verified checkpoint is never replaced
            if kind == "sync":
                got["sync"] = timed_sync_save(managers["sync"], step, model, optimizer)
            elif kind == "without":
                got["without"] = train_steps(model, optimizer, batch, steps, step_seconds=per_step[kind])
            else:
                got[kind] = train_steps(
                    model, optimizer, batch, steps, managers[kind], every, step * 1000, saves, per_step.get(kind)
                )
            if kind in managers:
                prune_old_checkpoints(managers[kind])
        rounds.append(got)
        windowed += windowed_losses(per_step["with_saves"], per_step["without"], every, saves)
    released_resident = managers["released"]._buffers.resident_bytes()
    for manager in managers.values():
        manager.close()
    return _loop_cost_entries(rounds, saves, steps, every, n_bytes, resident, released_resident, repeats, windowed)


def _loop_cost_entries(
    rounds: list[dict[str, float]],
    n_saves: int,
    steps: int,
    every: int,
    n_bytes: int,
    resident: int,
    released_resident: int,
    repeats: int,
    windowed: list[float],
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
            windowed_seconds_lost_per_save=median(windowed),
            windowed_seconds_lost_per_save_min=min(windowed),
            windowed_seconds_lost_per_save_max=max(windowed),
            windowed_loop_cost_ratio=median(windowed) / sync,
            **common,
            method="per round: (loop seconds with async saves - the same loop without, equal step counts) / saves "
            "/ a sync save's seconds in that round. The loop: forward, backward, wait_for_snapshot, AdamW step "
            "over the saved Linear stack; the wait for the last save to finish is inside the timed loop, so "
            "the stall, the writer thread's CPU and GIL taken from the following steps all count. Saves are "
            "save_every_steps apart (one ends before the next starts). windowed_*: a cross-check, not the "
            "verdict: per save, the steps from it to the next save less the same steps of the same round's "
            "loop without saves, median over every save of every round",
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
