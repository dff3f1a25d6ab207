"""Hugging Face Trainer: seal each checkpoint-N/ it saves, and resume only from one whose seal verifies.

from utils.training.integrations.huggingface import SealCheckpoints, newest_valid_checkpoint
trainer = transformers.Trainer(..., callbacks=[SealCheckpoints()])
trainer.train(resume_from_checkpoint=newest_valid_checkpoint(args.output_dir))  # None: start fresh
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import TrainerCallback

from ..engine.commit import CheckpointError
from ..engine.foreign_seals import scan_hf_checkpoints, seal_hf_checkpoint, set_aside_hf_checkpoints_after

log = logging.getLogger(__name__)
MIN_SAVE_TOTAL_LIMIT = 2


class SaveLimitTooLow(CheckpointError):
    """`save_total_limit=1` lets Hugging Face delete the last sealed checkpoint before the new one is sealed."""


class SealCheckpoints(TrainerCallback):
    """After each save, write our MANIFEST.json (every file's size and hash, fsynced, last) into
    the `checkpoint-N/` folder Hugging Face just wrote. At the start of training, checkpoints
    past the resume step (an interrupted or damaged future) move to `<output_dir>/abandoned/`."""

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        limit = args.save_total_limit
        if limit is not None and limit < MIN_SAVE_TOTAL_LIMIT:
            raise SaveLimitTooLow(
                args.output_dir,
                f"save_total_limit={limit}: Hugging Face deletes older checkpoints before the new one is sealed, "
                "so a crash in between would leave no sealed checkpoint",
                f"set save_total_limit to None or at least {MIN_SAVE_TOTAL_LIMIT}",
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            for moved in set_aside_hf_checkpoints_after(args.output_dir, state.global_step):
                log.warning("checkpoint past the resume step %d set aside (kept) at %s", state.global_step, moved)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _wait_for_every_rank()  # under torchrun each rank writes its own files (rng_state_R.pth, shards)
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            seal_hf_checkpoint(folder, state.global_step)


def _wait_for_every_rank() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def newest_valid_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` of `output_dir` whose seal verifies (every hash checked), or
    None when there is none (start fresh). Each one passed over is logged with its reason."""
    newest, skipped = scan_hf_checkpoints(output_dir, full=True)
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    return None if newest is None else str(newest)
