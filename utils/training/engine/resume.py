"""Resuming: which checkpoint to continue from, and putting its state back into a fresh trainer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import TrainingConfig
from .checkpoint import LoadedCheckpoint, list_checkpoints, load_checkpoint, read_training_state
from .commit import CheckpointCorrupt, UnsupportedFormat
from .dist_checkpoint import is_distributed_checkpoint, load_distributed, rank_state_file
from .reproducibility import set_rng_state

MODEL_SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "context_length")


class ResumeError(RuntimeError):
    """The requested resume cannot be done; the message names the path and the fix."""


def find_resume_checkpoint(run_dir: Path, resume: str, *, say: Callable[[str], None]) -> LoadedCheckpoint | None:
    """`resume` is auto (newest checkpoint that verifies, falling back past broken ones and
    saying so), never (refuse a run that has checkpoints) or the path of one checkpoint."""
    if resume == "never":
        if list_checkpoints(run_dir):
            raise ResumeError(
                f"run folder {run_dir} already has checkpoints and --resume never was given; "
                "use --resume auto to continue it, or a new --run-name"
            )
        return None
    if resume != "auto":
        return load_checkpoint(Path(resume))  # the user named it: no silent fallback
    for _, path in list_checkpoints(run_dir):
        try:
            return load_checkpoint(path)
        except UnsupportedFormat as exc:
            # Falling back would train on and overwrite a newer version's checkpoints.
            raise ResumeError(f"{exc}: this run was continued by a newer version of the package") from exc
        except CheckpointCorrupt as exc:
            say(f"skipping checkpoint {path}: {exc.reason}; falling back to an older one")
    return None


def check_compatible(loaded: LoadedCheckpoint, config: TrainingConfig) -> None:
    saved = loaded.trainer_state.get("config", {})
    for name in MODEL_SHAPE_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise ResumeError(
                f"checkpoint {loaded.path} has {name}={saved[name]} but the config says "
                f"{getattr(config, name)}; use the same model size, or a new --run-name"
            )


def restore_training_state(
    loaded: LoadedCheckpoint,
    runtime: Any,
    config: TrainingConfig,
    *,
    train_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    stream: Any,
    acc: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Optimizer, scheduler, scaler, data position, RNG, the epoch's running sums (into `acc`)
    and the trainer's counters and histories (into `state`). The weights are loaded already."""
    training_state = loaded.training_state
    own_file = loaded.path / rank_state_file(runtime.rank)
    if runtime.rank > 0 and own_file.is_file():  # this rank's RNG and running sums (same world size)
        training_state = read_training_state(own_file)
    if is_distributed_checkpoint(loaded.path):
        load_distributed(loaded.path, train_model, optimizer)
    elif runtime.distributed and config.distributed_strategy == "fsdp":
        raise ResumeError(
            f"{loaded.path} was written by a single process; an FSDP job resumes only from FSDP/DDP "
            "checkpoints. Resume it once with DDP (the default strategy), then switch to FSDP"
        )
    else:
        optimizer.load_state_dict(training_state["optimizer"])
    scheduler.load_state_dict(training_state["scheduler"])
    if training_state.get("scaler"):
        scaler.load_state_dict(training_state["scaler"])
    stream.load_state_dict(training_state["data"])  # the position is the same on every rank
    set_rng_state(training_state["rng"])
    for key, value in training_state["accumulators"].items():
        acc[key] = value.to(acc[key].device) if isinstance(value, torch.Tensor) else value
    trainer_state = loaded.trainer_state
    for key in ("step", "epoch", "metrics_history", "best", "wall_seconds"):
        state[key] = trainer_state.get(key, state[key])
    state["resume_count"] = int(trainer_state.get("resume_count", 0)) + 1
