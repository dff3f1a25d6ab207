"""Which steps a run's checkpoints hold (newest, best), and the model state a save hands over."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint import list_checkpoints
from .commit import CheckpointCorrupt, cheap_check


def latest_step(run_dir: Path) -> int | None:
    """Step of the newest checkpoint that passes the cheap check, or None."""
    for step, path in list_checkpoints(run_dir):
        try:
            cheap_check(path)
            return step
        except CheckpointCorrupt:
            continue
    return None


def best_step(run_dir: Path, monitor_metric: str, monitor_mode: str) -> int | None:
    """The step whose manifest has the best monitored metric; the newest when none has it."""
    scored: list[tuple[float, int]] = []
    newest = None
    for step, path in list_checkpoints(run_dir):
        try:
            manifest = cheap_check(path)
        except CheckpointCorrupt:
            continue
        newest = step if newest is None else newest
        value = (manifest.get("metrics") or {}).get(monitor_metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((value if monitor_mode == "min" else -value, -step))
    return -min(scored)[1] if scored else newest


def model_state_for_save(model: torch.nn.Module, *, copy_buffers: bool) -> dict[str, torch.Tensor]:
    """model.state_dict(), with buffers cloned when the save is asynchronous: the next forward
    pass updates BatchNorm statistics (and DDP broadcasts buffers) in place, before the writer
    thread has copied them. Parameters stay as they are: the optimizer step waits for the copy."""
    state = model.state_dict()
    if not copy_buffers:
        return state
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v.detach().clone() if k in buffers else v for k, v in state.items()}
