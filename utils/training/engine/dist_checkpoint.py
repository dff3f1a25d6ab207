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
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    TRAINER_FILE,
    LoadedCheckpoint,
    NoCheckpointFound,
    apply_retention,
    load_checkpoint,
    saved_at_field,
    split_tied,
    step_dir_name,
)
from .checkpoint_index import refresh_index
from .checkpoint_steps import best_step, latest_step
from .commit import (
    MAX_JSON_BYTES,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointWriteError,
    HashingWriter,
    commit_dir,
    fsync_dir,
    hash_file,
    new_temp_dir,
    read_capped,
    read_manifest,
    remove_tree,
    verify,
    write_json_file,
    write_manifest,
)
from .serialization import save_training_state, write_safetensors

DCP_DIR = "dcp"


def rank_state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"training_state.rank-{rank}.pt"


def is_distributed_checkpoint(path: Path, manifest: dict[str, Any] | None = None) -> bool:
    """A checkpoint whose sealed manifest lists files under dcp/ (a dcp/ folder alone is not
    enough: a planted one is never loaded)."""
    path = Path(path)
    if not (path / DCP_DIR).is_dir():
        return False
    if manifest is None:
        try:
            manifest = read_manifest(path)
        except CheckpointCorrupt:
            return False
    return any(name.startswith(DCP_DIR + "/") for name in manifest["files"])


class DistributedCheckpointManager:
    """Collective saves for a torchrun job, with the verbs of CheckpointManager.

    `save()` writes every rank's shard through `dcp.async_save` (staged to CPU, written in a
    background thread over a dedicated gloo group, so it never interleaves with the
    training collectives) or `dcp.save`; the commit (barrier, manifest by rank 0, rename)
    happens in `wait_until_finished()`, which the next save and `close()` call on every rank.
    """

    def __init__(
        self, runtime: Any, run_dir: Path, *, keep_last: int, keep_best: int, monitor_metric: str,
        monitor_mode: str, async_save: bool = True,
    ) -> None:  # fmt: skip
        self.runtime = runtime
        self.run_dir = Path(run_dir)
        self.retention = dict(keep_last=keep_last, keep_best=keep_best, monitor_metric=monitor_metric,
                              monitor_mode=monitor_mode)  # fmt: skip
        self.monitor_metric, self.monitor_mode = monitor_metric, monitor_mode
        self.async_save = async_save and hasattr(dcp, "async_save")
        self._group = dist.new_group(backend="gloo") if self.async_save else None
        self._pending: dict[str, Any] | None = None
        self.last_saved_path: Path | None = None
        self.saves_completed = 0

    def save(
        self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        training_state: dict[str, Any], trainer_state: dict[str, Any], manifest_fields: dict[str, Any],
    ) -> None:  # fmt: skip
        """Collective. A failed previous save never drops this one: its error (the same on every
        rank) is raised after this state is handed over."""
        previous: CheckpointWriteError | None = None
        try:
            self.wait_until_finished()
        except CheckpointWriteError as exc:
            previous = exc
        self._start_save(step, model, optimizer, training_state, trainer_state, manifest_fields)
        if not self.async_save:
            try:
                self.wait_until_finished()
            except CheckpointWriteError as exc:
                raise exc from previous
        if previous is not None:
            raise previous

    def _start_save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    training_state: dict[str, Any], trainer_state: dict[str, Any],
                    manifest_fields: dict[str, Any]) -> None:  # fmt: skip
        rt = self.runtime
        final = self.run_dir / step_dir_name(step)
        tmp_name = new_temp_dir(self.run_dir, final.name).name if rt.is_main else None
        tmp = self.run_dir / rt.broadcast_object(tmp_name)
        pending: dict[str, Any] = {"tmp": tmp, "final": final, "future": None, "error": None,
                                   "fields": {"step": step, **saved_at_field(trainer_state), **manifest_fields}}  # fmt: skip
        try:
            model_state, optim_state = get_state_dict(model, optimizer)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            writer = HashingWriter(tmp / rank_state_file(rt.rank))
            save_training_state({k: v for k, v in training_state.items() if k != "optimizer"}, writer)
            writer.close()
            if rt.is_main:
                unique, aliases = split_tied({k: v.contiguous() for k, v in full.items()})
                model_writer = HashingWriter(tmp / MODEL_FILE)
                write_safetensors(model_writer, unique, {"aliases": json.dumps(aliases), "step": str(step)})
                model_writer.close()
                write_json_file(tmp / TRAINER_FILE, trainer_state)
            state = {"model": model_state, "optim": optim_state}
            if self.async_save:
                pending["future"] = dcp.async_save(state, checkpoint_id=tmp / DCP_DIR, process_group=self._group)
            else:
                dcp.save(state, checkpoint_id=tmp / DCP_DIR)
        except OSError as exc:
            pending["error"] = f"rank {rt.rank}: {exc.strerror or exc}"
        self._pending = pending

    def wait_until_finished(self) -> None:
        """Collective: finish the save in flight and commit it (rank 0) once every shard is written."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        rt = self.runtime
        error = pending["error"]
        if pending["future"] is not None and error is None:
            try:
                pending["future"].result()
            except Exception as exc:  # the writer thread's OSError, or a failed collective
                error = f"rank {rt.rank}: {exc}"
        errors = [None] * rt.world_size
        dist.all_gather_object(errors, error)  # doubles as the barrier: every shard is on disk
        failed = [e for e in errors if e]
        tmp, final = pending["tmp"], pending["final"]
        if not failed and rt.is_main:
            try:
                files = {}
                for folder, _, names in os.walk(tmp):
                    for name in names:
                        path = Path(folder) / name
                        files[path.relative_to(tmp).as_posix()] = hash_file(path)
                fsync_dir(tmp / DCP_DIR)
                write_manifest(tmp, files, world_size=rt.world_size, **pending["fields"])
                commit_dir(tmp, final)
                apply_retention(self.run_dir, **self.retention)
                refresh_index(self.run_dir)
            except (OSError, CheckpointError) as exc:  # every rank must hear of it, or they wait for ever
                failed = [f"commit: {getattr(exc, 'strerror', None) or exc}"]
        failed = rt.broadcast_object(failed)
        if failed:
            if rt.is_main:
                remove_tree(tmp)
            raise CheckpointWriteError(final, f"distributed save failed: {'; '.join(failed)}",
                                       "free disk space; older checkpoints are intact")  # fmt: skip
        self.last_saved_path = final
        self.saves_completed += 1

    def restore(self, step: int | None = None, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
        """Load checkpoint `step` (default: the newest that verifies); its dcp/ shards are loaded
        into a wrapped model with `load_distributed`. Collective: finishes a save in flight."""
        self.wait_until_finished()
        if step is None:
            step = latest_step(self.run_dir)
            if step is None:
                raise NoCheckpointFound(self.run_dir, "no checkpoint that verifies", "train first")
        return load_checkpoint(self.run_dir / step_dir_name(step), map_location)

    def latest_step(self) -> int | None:
        return latest_step(self.run_dir)

    def best_step(self) -> int | None:
        return best_step(self.run_dir, self.monitor_metric, self.monitor_mode)

    def wait_for_snapshot(self) -> None:
        """dcp.async_save has already staged the state to CPU when it returns."""

    def check(self) -> None:
        """Errors of a distributed save surface at the collective wait_until_finished()."""

    def close(self, raise_errors: bool = True) -> None:
        try:
            self.wait_until_finished()
        except CheckpointWriteError:
            if raise_errors:
                raise


# The classes a .metadata file written by torch.distributed.checkpoint refers to, and nothing else.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    *(
        (_DCP_METADATA_MODULE, name)
        for name in (
            "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
            "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}  # fmt: skip


class UnsafeCheckpoint(CheckpointCorrupt):
    """A checkpoint file asks to run or import something a checkpoint never needs."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's own metadata classes and torch dtypes; anything else is refused
    before it is imported, so a planted payload never runs."""

    def __init__(self, raw: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(raw))
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _ALLOWED_GLOBALS and not dtype:
            raise UnsafeCheckpoint(
                self._path,
                f"refers to {module}.{name}, which is not part of torch.distributed.checkpoint metadata; not loaded",
                "this checkpoint was tampered with or is foreign; delete it",
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint(self._path, "uses persistent ids, which DCP metadata never does; not loaded")


def read_dcp_metadata(path: Path) -> Metadata:
    """Read a DCP `.metadata` file through the restricted unpickler."""
    path = Path(path)
    raw = read_capped(path, MAX_JSON_BYTES)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointCorrupt(path, f"larger than {MAX_JSON_BYTES} bytes; not DCP metadata")
    try:
        metadata = _MetadataUnpickler(raw, path).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means damaged metadata
        raise CheckpointCorrupt(path, f"DCP metadata cannot be read ({type(exc).__name__})") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointCorrupt(path, f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor items with torch.load(weights_only=True)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def check_dcp_listed(path: Path, manifest: dict[str, Any]) -> None:
    """Every file under dcp/ must be listed (and so hashed) in the sealed manifest."""
    root = Path(path) / DCP_DIR
    for folder, dirnames, names in os.walk(root, followlinks=False):
        for name in names + [d for d in dirnames if os.path.islink(os.path.join(folder, d))]:
            rel = (Path(folder) / name).relative_to(path).as_posix()
            if rel not in manifest["files"]:
                raise CheckpointCorrupt(
                    Path(folder) / name, f"{rel} is not listed in the manifest; nothing unlisted is loaded",
                    "delete it, or use another checkpoint",
                )  # fmt: skip


def load_distributed(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, manifest: dict[str, Any] | None = None
) -> None:
    """Load model and optimizer from dcp/ into the (possibly wrapped or sharded) model. Works
    with any world size, including a single process with no process group. Only files the
    sealed manifest lists are read: pass the manifest of a checkpoint already verified by
    hash, or it is verified here; `.metadata` goes through the restricted unpickler."""
    path = Path(path)
    if manifest is None:
        manifest = verify(path)
    if not is_distributed_checkpoint(path, manifest):
        raise CheckpointCorrupt(path, "the manifest lists no dcp/ files; not a distributed checkpoint")
    check_dcp_listed(path, manifest)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=SafeFileSystemReader(path / DCP_DIR), planner=SafeLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
