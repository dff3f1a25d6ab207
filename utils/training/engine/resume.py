"""Resuming: which checkpoint to continue from, and whether it fits the config (TrainState.restore puts it back)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import TrainingConfig
from .checkpoint import LoadedCheckpoint, list_checkpoints, load_checkpoint
from .commit import CheckpointCorrupt, UnsupportedFormat

MODEL_SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "context_length")


class ResumeError(RuntimeError):
    """The requested resume cannot be done; the message names the path and the fix."""


def find_resume_checkpoint(run_dir: Path, resume: str, *, say: Callable[[str], None]) -> LoadedCheckpoint | None:
    """`resume` is auto (newest checkpoint that verifies, falling back past broken ones and
    saying so), never (refuse a run that has checkpoints) or the path of one checkpoint."""
    if resume == "never":
        if list_checkpoints(run_dir):
            raise ResumeError(
                f"run folder {run_dir} already has checkpoints and resume=never was given; "
                "continue it with resume=auto, or use a new run name"
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
                f"{getattr(config, name)}; use the same model size, or use a new run name"
            )
