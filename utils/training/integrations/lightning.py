"""PyTorch Lightning: commit each .ckpt through our protocol with a seal beside it, and resume only from a sealed one.

    from utils.training.integrations.lightning import SealCheckpoints, newest_valid_checkpoint
    trainer = lightning.Trainer(..., callbacks=[SealCheckpoints(), ModelCheckpoint(dirpath=checkpoint_dir, ...)])
    trainer.fit(model, ckpt_path=newest_valid_checkpoint(checkpoint_dir))  # None: start fresh

The seal of `<name>.ckpt` is `<name>.ckpt.manifest.json` (size, hash, `global_step`), written
after the file was written to a temporary name, fsynced and renamed into place. Lightning
checkpoints are pickles: a trainer with SealCheckpoints loads only a sealed one, and only with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from ..engine.commit import CheckpointCorrupt, CheckpointError
from ..engine.foreign_seals import (
    NotSealed,
    check_lightning_checkpoint,
    commit_lightning_file,
    remove_seal,
    scan_lightning_checkpoints,
    temp_ckpt_path,
)

log = logging.getLogger(__name__)


class CheckpointDirNotSet(CheckpointError):
    """A ModelCheckpoint without an explicit dirpath: its folder depends on the logger, so the
    resume could not be told where to look."""


class UnsupportedCheckpointIO(CheckpointError):
    """The trainer's CheckpointIO writes in the background; a seal written after it would vouch for nothing."""


class UnsafeCheckpoint(CheckpointError):
    """A sealed checkpoint that would run code to load: torch.load(weights_only=True) refused it."""


class SealingCheckpointIO(CheckpointIO):
    """Wraps the trainer's CheckpointIO: saves are committed (temp file, fsync, rename, seal
    last), removals drop the seal first, loads verify the seal before anything is unpickled."""

    def __init__(self, inner: CheckpointIO) -> None:
        super().__init__()
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_ckpt_path(final)
        try:
            self.inner.save_checkpoint(checkpoint, tmp, storage_options=storage_options)
            commit_lightning_file(tmp, final, int(checkpoint.get("global_step", 0)))
        finally:
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()  # a save that failed before its rename: never taken, now removed

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            check_lightning_checkpoint(path, full=True)
        except NotSealed as exc:
            raise NotSealed(
                path,
                "refusing to load it: it has no seal of ours, so nothing says it is complete or that it was "
                "written by this run, and Lightning checkpoints are pickles",
                "pass ckpt_path=newest_valid_checkpoint(dirpath) to resume from a sealed checkpoint",
            ) from exc
        try:
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpoint(
                path,
                f"it holds objects that torch.load(weights_only=True) refuses to build ({exc})",
                "keep tensors and plain types in the checkpoint (hyperparameters as a dict), "
                "or load it yourself without SealCheckpoints if you trust where it came from",
            ) from exc

    def remove_checkpoint(self, path: Any) -> None:
        remove_seal(path)
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class SealCheckpoints(pl.Callback):
    """Installs SealingCheckpointIO on the trainer's strategy in `setup()`; every ModelCheckpoint
    of the trainer must have an explicit `dirpath` (the folder `newest_valid_checkpoint` reads)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None) is None:
                raise CheckpointDirNotSet(
                    os.getcwd(),
                    "a ModelCheckpoint has no dirpath, so where its checkpoints land depends on the logger",
                    "pass ModelCheckpoint(dirpath=...) and give the same folder to newest_valid_checkpoint",
                )
        strategy = trainer.strategy
        if isinstance(strategy.checkpoint_io, AsyncCheckpointIO):
            raise UnsupportedCheckpointIO(
                os.getcwd(),
                "AsyncCheckpointIO returns before the file is written, so it cannot be sealed after the write",
                "drop the AsyncCheckpointIO plugin when using SealCheckpoints",
            )
        if not isinstance(strategy.checkpoint_io, SealingCheckpointIO):
            strategy.checkpoint_io = SealingCheckpointIO(strategy.checkpoint_io)


def newest_valid_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """The sealed `.ckpt` in `checkpoint_dir` with the highest global_step whose hash verifies,
    or None when there is none (start fresh). Each file passed over is logged with its reason."""
    newest, _, skipped = scan_lightning_checkpoints(checkpoint_dir, full=True)
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    return None if newest is None else str(newest)


__all__ = [
    "CheckpointCorrupt",
    "CheckpointDirNotSet",
    "NotSealed",
    "SealCheckpoints",
    "SealingCheckpointIO",
    "UnsafeCheckpoint",
    "UnsupportedCheckpointIO",
    "newest_valid_checkpoint",
]
