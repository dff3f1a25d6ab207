"""The newest checkpoint truncated (a kill or a full disk mid-write, a sync that never reached the
disk): what each framework's own resume path does with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.saving import build_state

from .frameworks import ADAPTERS


def truncate_largest(path: Path) -> str:
    """Cut the largest file of a checkpoint (folder or file) to half its size; returns its name."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    largest = max(files, key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    return largest.name


def _outcome(resume: Any) -> dict[str, Any]:
    try:
        used = resume()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # what the user sees is the point (DCP's CheckpointException is a BaseException)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return {"outcome": "error", "error": f"{type(exc).__name__}: {first}"}
    return {"outcome": "resumed", "from": used}


def bench_truncated_newest(workdir: Path, state_mib: float, width: int) -> dict[str, Any]:
    """Each framework writes checkpoints at steps 1 and 2, the newest is truncated, then its resume
    path is asked for the newest checkpoint and loads it."""
    model, optimizer = build_state(state_mib, width)
    results: dict[str, Any] = {}
    for cls in ADAPTERS:
        adapter = cls(workdir / cls.__name__.lower(), model, optimizer)
        adapter.save(1)
        newest = adapter.save(2)
        cut = truncate_largest(newest)
        results[adapter.name] = {"truncated_file": cut, **_outcome(lambda a=adapter: _resume(a))}
    return results


def _resume(adapter: Any) -> str:
    """The framework's own way to find and load the newest checkpoint; returns what it loaded."""
    name = type(adapter).__name__
    if name == "Project":
        from utils.training.engine.checkpoint import latest_valid_checkpoint, load_checkpoint

        path, skipped = latest_valid_checkpoint(adapter.root)
        assert path is not None
        load_checkpoint(path)
        return f"{path.name} (passed over {len(skipped)}: {skipped[0]['reason'] if skipped else ''})"
    if name == "HuggingFace":
        from transformers.trainer_utils import get_last_checkpoint

        newest = get_last_checkpoint(str(adapter.root))
        adapter.trainer._load_from_checkpoint(newest)
        adapter.trainer._load_optimizer_and_scheduler(newest)
        return Path(newest).name
    if name == "Lightning":
        newest = max(adapter.root.glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        adapter.trainer.strategy.checkpoint_io.load_checkpoint(newest)  # what fit(ckpt_path=...) reads first
        return newest.name
    if name == "TorchSave":
        newest = max(adapter.root.glob("*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        torch.load(newest, weights_only=True)
        return newest.name
    import torch.distributed.checkpoint as dcp

    newest = max(adapter.root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    dcp.load(adapter.state(), checkpoint_id=str(newest))
    return newest.name
