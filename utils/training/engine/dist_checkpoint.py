"""Distributed checkpoints: every rank writes its own shard through torch.distributed.checkpoint,
inside the same commit protocol (rank 0 writes the manifest after a barrier and renames).

A distributed `step-NNNNNN/` holds, besides the files of a single-process checkpoint:
  dcp/                       model and optimizer, one shard file per rank (+ .metadata)
  training_state.rank-R.pt   rank R's RNG, data position and running sums (R > 0)
`model.safetensors` holds the full weights (gathered once per save), so recovery, the
notebook's inference cell and a resume with another world size read it like any other.
`training_state.pt` is rank 0's and carries no optimizer (that lives in dcp/).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .checkpoint import MODEL_FILE, STATE_FILE, TRAINER_FILE, apply_retention, split_tied, step_dir_name
from .commit import (
    CHUNK_BYTES,
    CheckpointWriteError,
    HashingWriter,
    commit_dir,
    fsync_dir,
    new_hasher,
    new_temp_dir,
    remove_tree,
    write_json_file,
    write_manifest,
)

DCP_DIR = "dcp"


def rank_state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"training_state.rank-{rank}.pt"


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _hash_file(path: Path) -> dict[str, Any]:
    hasher = new_hasher()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return {"size_bytes": size, "hash": hasher.hexdigest()}


def save_distributed(
    runtime: Any,
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    manifest_fields: dict[str, Any],
    keep_last: int,
    keep_best: int,
    monitor_metric: str,
    monitor_mode: str,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the committed folder."""
    rank = runtime.rank
    final = Path(run_dir) / step_dir_name(step)
    tmp_name = new_temp_dir(Path(run_dir), final.name).name if runtime.is_main else None
    tmp = Path(run_dir) / runtime.broadcast_object(tmp_name)
    error: str | None = None
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / DCP_DIR)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        buffer = io.BytesIO()
        torch.save({k: v for k, v in training_state.items() if k != "optimizer"}, buffer)
        writer = HashingWriter(tmp / rank_state_file(rank))
        writer.write(buffer.getbuffer())
        writer.close()
        if runtime.is_main:
            unique, aliases = split_tied({k: v.contiguous() for k, v in full.items()})
            save_file(unique, str(tmp / MODEL_FILE), metadata={"aliases": json.dumps(aliases), "step": str(step)})
            with open(tmp / MODEL_FILE, "rb+") as f:
                os.fsync(f.fileno())
            write_json_file(tmp / TRAINER_FILE, trainer_state)
    except OSError as exc:
        error = f"rank {rank}: {exc.strerror or exc}"
    errors = [None] * runtime.world_size
    dist.all_gather_object(errors, error)  # doubles as the barrier: every shard is on disk
    failed = [e for e in errors if e]
    if failed:
        if runtime.is_main:
            remove_tree(tmp)
        raise CheckpointWriteError(
            final, f"distributed save failed: {'; '.join(failed)}", "free disk space; older checkpoints are intact"
        )
    if runtime.is_main:
        try:
            files = {}
            for folder, _, names in os.walk(tmp):
                for name in names:
                    path = Path(folder) / name
                    files[path.relative_to(tmp).as_posix()] = _hash_file(path)
            fsync_dir(tmp / DCP_DIR)
            write_manifest(tmp, files, world_size=runtime.world_size, **manifest_fields)
            commit_dir(tmp, final)
            apply_retention(
                Path(run_dir), keep_last=keep_last, keep_best=keep_best,
                monitor_metric=monitor_metric, monitor_mode=monitor_mode,
            )  # fmt: skip
        except OSError as exc:
            remove_tree(tmp)
            error = f"commit failed: {exc.strerror or exc}"
    error = runtime.broadcast_object(error)
    if error:
        raise CheckpointWriteError(final, error, "free disk space; older checkpoints are intact")
    return final


def load_distributed(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimizer from dcp/ into the (possibly wrapped or sharded) model. Works
    with any world size, including a single process with no process group."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=Path(path) / DCP_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
