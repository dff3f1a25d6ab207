"""Checkpoints: what one holds, how it is saved (sync or async), loaded, listed and pruned.

A checkpoint folder `step-NNNNNN/` holds `model.safetensors` (weights: no code runs on
load), `training_state.safetensors` (optimizer, scheduler, scaler, RNG, data position: tensors
plus a JSON structure; format-2 checkpoints have `training_state.pt`, read with
`torch.load(weights_only=True)`), `trainer_state.json` (step, epoch, metrics, best, drift)
and `MANIFEST.json`, committed by the protocol in `commit.py`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint_index import (  # noqa: F401 - listing and retention live there (torch-free); re-exported
    STEP_DIR,
    CheckpointError,
    CheckpointListingError,
    NoCheckpointFound,
    apply_retention,
    best_verified_checkpoint,
    latest_valid_checkpoint,
    latest_verified_checkpoint,
    list_checkpoints,
    list_leftovers,
    ranked_checkpoints,
    refresh_index,
    saved_at_field,
    step_dir_name,
)
from .commit import (
    MANIFEST_NAME,
    CheckpointCorrupt,
    CheckpointWriteError,
    HashingWriter,
    cheap_check,
    commit_dir,
    encode_json,
    new_temp_dir,
    remove_tree,
    verify,
    write_json_file,
    write_manifest,
)
from .serialization import (
    LEGACY_STATE_FILE,
    MODEL_FILE,
    STATE_FILE,
    encode_training_state,
    model_metadata,
    read_model_file,
    read_training_state,
    split_tied,
    training_state_metadata,
    write_safetensors,
    write_training_state,
)
from .snapshot import (  # noqa: F401 - StateBuffers and copies_non_blocking re-exported
    FilledFile,
    FilledFileWriter,
    StateBuffers,
    copies_non_blocking,
    fillable,
)
from .trainer_state import TRAINER_FILE, read_trainer_state

log = logging.getLogger(__name__)

# Every thread a save starts is named with this prefix (benchmarks/loop.py waits on them by name).
SAVE_THREAD_PREFIX = "checkpoint-"


# -- serialisation ------------------------------------------------------------------------
@dataclass
class Snapshot:
    step: int
    model_state: dict[str, torch.Tensor]
    aliases: dict[str, str]
    training_state: dict[str, Any]
    trainer_state_json: bytes  # encoded when save() is called: the loop may change the dict after
    manifest_fields: dict[str, Any]
    # Files built whole in host memory, hashed while the state was copied in (an async save on
    # the CPU): written as they are instead of from model_state / training_state.
    filled: dict[str, FilledFile] = field(default_factory=dict)


class _BackgroundClose:
    """Close (fsync) a finished file in a helper thread while the next file is written."""

    def __init__(self, writer: HashingWriter) -> None:
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._close, args=(writer,), name=f"{SAVE_THREAD_PREFIX}fsync", daemon=True
        )
        self._thread.start()

    def _close(self, writer: HashingWriter) -> None:
        try:
            self._result = writer.close()
        except BaseException as exc:  # raised on the writing thread by result()
            self._error = exc

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def write_checkpoint(run_dir: Path, snap: Snapshot) -> Path:
    """Write and commit one checkpoint. On any failure the temp folder is removed, nothing
    already on disk is touched, and CheckpointWriteError says what happened."""
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(snap.step)
    tmp: Path | None = None
    try:
        tmp = new_temp_dir(run_dir, final.name)
        files: dict[str, dict[str, Any]] = {}
        writer = _write_model_file(tmp, snap)
        model_closed = _BackgroundClose(writer)  # its fsync overlaps the writing of the training state
        try:
            state_file, writer = _write_state_file(tmp, snap)
            files[state_file] = writer.close()
        finally:
            files[MODEL_FILE] = model_closed.result()
        files[TRAINER_FILE] = write_json_file(tmp / TRAINER_FILE, snap.trainer_state_json)
        write_manifest(tmp, files, **snap.manifest_fields)
        commit_dir(tmp, final)
        return final
    except OSError as exc:
        if tmp is not None:
            remove_tree(tmp)
        raise CheckpointWriteError(
            final,
            f"save failed: {exc.strerror or exc}",
            "free disk space or fix permissions; the previous checkpoints are intact",
        ) from exc
    except BaseException:
        if tmp is not None:
            remove_tree(tmp)
        raise


def filled_snapshot(
    buffers: StateBuffers,
    step: int,
    unique: dict[str, torch.Tensor],
    aliases: dict[str, str],
    training_state: dict[str, Any],
    trainer_json: bytes,
    fields: dict[str, Any],
) -> Snapshot:
    """An async save's snapshot on the CPU: each file whose tensors are all plain CPU tensors is
    built whole in `buffers`, hashed while the tensors are copied in (StateBuffers.fill_file); a
    file that cannot be (a state that needs torch.save) is copied tensor by tensor, as on CUDA."""
    filled: dict[str, FilledFile] = {}
    model_state: dict[str, torch.Tensor] = {}
    if fillable(unique):
        filled[MODEL_FILE] = buffers.fill_file(MODEL_FILE, unique, model_metadata(aliases, step))
    else:
        model_state = buffers.snapshot(unique, ("model",))
    state: dict[str, Any] = {}
    encoded = encode_training_state(training_state)
    if encoded is not None and fillable(encoded[0]):
        filled[STATE_FILE] = buffers.fill_file(STATE_FILE, encoded[0], training_state_metadata(encoded[1]))
    else:
        state = buffers.snapshot(training_state, ("training",))
    return Snapshot(step, model_state, aliases, state, trainer_json, fields, filled)


def _write_model_file(tmp: Path, snap: Snapshot) -> HashingWriter | FilledFileWriter:
    """Write the weights file (not yet fsynced: the returned writer's close() does it)."""
    filled = snap.filled.get(MODEL_FILE)
    if filled is not None:
        return _written(FilledFileWriter(tmp / MODEL_FILE, filled), FilledFileWriter.write_all)
    metadata = model_metadata(snap.aliases, snap.step)
    return _written(HashingWriter(tmp / MODEL_FILE), lambda w: write_safetensors(w, snap.model_state, metadata))


def _write_state_file(tmp: Path, snap: Snapshot) -> tuple[str, HashingWriter | FilledFileWriter]:
    """Write the training-state file; returns its name and its writer, not yet closed."""
    filled = snap.filled.get(STATE_FILE)
    if filled is not None:
        return STATE_FILE, _written(FilledFileWriter(tmp / STATE_FILE, filled), FilledFileWriter.write_all)
    encoded = encode_training_state(snap.training_state)
    state_file = STATE_FILE if encoded is not None else LEGACY_STATE_FILE
    writer = HashingWriter(tmp / state_file)
    return state_file, _written(writer, lambda w: write_training_state(w, snap.training_state, encoded))


def _written(writer: Any, fill: Any) -> Any:
    """`writer` after `fill(writer)`; on any failure the file is closed unfinished and the error raised."""
    try:
        fill(writer)
    except BaseException:
        writer.abort()
        raise
    return writer


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    trainer_state: dict[str, Any]
    manifest: dict[str, Any]


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, verified: bool = False
) -> LoadedCheckpoint:
    """Verify every hash, then load. Raises CheckpointCorrupt naming the bad file."""
    path = Path(path)
    manifest = cheap_check(path) if verified else verify(path)
    trainer_state = read_trainer_state(path, manifest)
    step = manifest.get("step", trainer_state.get("step", 0))
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointCorrupt(path / MANIFEST_NAME, f"manifest step {step!r} is not an integer >= 0")
    state_file = training_state_file(path, manifest)
    training_state = read_training_state(path / state_file, map_location)
    if not isinstance(training_state, dict):
        raise CheckpointCorrupt(path / state_file, f"{state_file} does not hold a dict; not a training state")
    return LoadedCheckpoint(
        path=path,
        step=step,
        model_state=read_model_file(path / MODEL_FILE),
        training_state=training_state,
        trainer_state=trainer_state,
        manifest=manifest,
    )


def training_state_file(path: Path, manifest: dict[str, Any]) -> str:
    """The training-state file the manifest lists: STATE_FILE (format 3), or LEGACY_STATE_FILE
    (`torch.save`, read with weights_only=True) of format-2 checkpoints."""
    listed = manifest.get("files") or {}
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        if name in listed:
            return name
    raise CheckpointCorrupt(path / MANIFEST_NAME, f"the manifest lists no {STATE_FILE} (nor {LEGACY_STATE_FILE})")


# -- the manager: one guarded entry per action, background writer named and joined --------
class CheckpointManager:
    """Saves checkpoints for one run, synchronously or in a background thread.

    `save()` hands the state to the writer thread, which copies it into reusable CPU buffers
    (on the CPU each file whole, hashed as it is copied in: `snapshot.py`; the loop waits for
    that copy only at its next optimizer step: `wait_for_snapshot()`) and then commits it.
    At most one save is in flight; a writer
    error is raised by the next `save()`, `check()`, `wait_until_finished()` or `close()`.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        keep_last: int,
        keep_best: int,
        monitor_metric: str,
        monitor_mode: str,
        async_save: bool = True,
        release_buffers: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor_metric = monitor_metric
        self.monitor_mode = monitor_mode
        self.async_save = async_save
        # Free the snapshot buffers after each save instead of keeping them (a full host copy of
        # the state) for the next one; each save then pays for allocating them again.
        self.release_buffers = release_buffers
        self._buffers = StateBuffers()
        self._thread: threading.Thread | None = None
        self._snapshot_taken = threading.Event()
        self._snapshot_taken.set()
        self._errors: list[BaseException] = []  # of finished saves, oldest first; check() raises each once
        self.last_saved_path: Path | None = None
        self.saves_completed = 0

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(raise_errors=exc[0] is None)

    def save(
        self,
        step: int,
        *,
        training_state: dict[str, Any],
        trainer_state: dict[str, Any],
        manifest_fields: dict[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        model_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Save `model` (or a ready `model_state`) and `optimizer` with the training and trainer
        state as checkpoint `step`. Buffers that the next forward pass changes in place (BatchNorm
        running statistics, an EMA) are copied now, before this returns; parameters and optimizer
        state change only at the next optimizer step, which waits for the snapshot. A failed
        previous save never drops this one: it is raised by check() after this state is handed over."""
        if model_state is None:
            if model is None:
                raise TypeError("CheckpointManager.save needs model= or model_state=")
            from .checkpoint_steps import model_state_for_save

            model_state = model_state_for_save(model, copy_buffers=self.async_save)
        if optimizer is not None:
            training_state = {**training_state, "optimizer": optimizer.state_dict()}
        self._join()
        unique, aliases = split_tied(model_state)
        trainer_json = encode_json(trainer_state)
        fields = {"step": step, **saved_at_field(trainer_state), **(manifest_fields or {})}

        def take_snapshot() -> Snapshot:
            return Snapshot(
                step=step,
                model_state=self._buffers.snapshot(unique, ("model",), copy_cpu=self.async_save),
                aliases=aliases,
                training_state=self._buffers.snapshot(training_state, ("training",), copy_cpu=self.async_save),
                trainer_state_json=trainer_json,
                manifest_fields=fields,
            )

        if not self.async_save:
            snap = take_snapshot()
            self._commit(snap)
            self.check()
            return
        self._snapshot_taken.clear()
        on_cuda = any(t.is_cuda for t in unique.values())
        if on_cuda:
            # Non-blocking device-to-host copies, queued on the stream before the next optimizer
            # step, so they read this step's values; the writer waits for them on an event.
            snap = take_snapshot()
            copied = torch.cuda.Event()
            copied.record()
            self._snapshot_taken.set()

            def take_snapshot() -> Snapshot:
                copied.synchronize()
                return snap

        else:

            def take_snapshot() -> Snapshot:  # on the CPU: files built whole, hashed as they are copied in
                return filled_snapshot(self._buffers, step, unique, aliases, training_state, trainer_json, fields)

        self._thread = threading.Thread(
            target=self._snapshot_and_commit, args=(take_snapshot,), name=f"{SAVE_THREAD_PREFIX}writer", daemon=True
        )
        self._thread.start()

    def _snapshot_and_commit(self, take_snapshot: Any) -> None:
        try:
            snap = take_snapshot()
        except BaseException as exc:  # handed to the training thread by check()
            self._errors.append(exc)
            return
        finally:
            self._snapshot_taken.set()
        self._commit(snap)

    def wait_for_snapshot(self) -> None:
        """Block until the state handed to the last save() has been copied. On CPU the copy
        runs in the writer thread, overlapping the next forward and backward; the loop calls
        this just before the optimizer step, the first thing that changes that state."""
        self._snapshot_taken.wait()

    def _commit(self, snap: Snapshot) -> None:
        try:
            self.last_saved_path = write_checkpoint(self.run_dir, snap)
            self.saves_completed += 1
            if self.release_buffers:
                self._buffers.release()
            apply_retention(
                self.run_dir,
                keep_last=self.keep_last,
                keep_best=self.keep_best,
                monitor_metric=self.monitor_metric,
                monitor_mode=self.monitor_mode,
            )
            refresh_index(self.run_dir)  # what recovery ranks by without reading every manifest
        except BaseException as exc:  # handed to the training thread by check()
            self._errors.append(exc)

    def restore(self, step: int | None = None, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
        """Load checkpoint `step` (default: the newest one that verifies), every hash checked."""
        self.wait_until_finished()
        if step is not None:
            return load_checkpoint(self.run_dir / step_dir_name(step), map_location)
        entries, _ = ranked_checkpoints(self.run_dir)  # newest by saved_at; name and manifest step agree
        for entry in entries:
            try:
                return load_checkpoint(entry.path, map_location)
            except CheckpointCorrupt as exc:
                log.warning("skipping checkpoint %s: %s", entry.path, exc.reason)
        raise NoCheckpointFound(self.run_dir, "no checkpoint that verifies", "train first, or check the folder")

    def latest_step(self) -> int | None:
        """Step of the newest checkpoint that passes the cheap check, or None."""
        from .checkpoint_steps import latest_step

        return latest_step(self.run_dir)

    def best_step(self) -> int | None:
        """Step of the best checkpoint by the monitored metric (newest when none has it), or None."""
        from .checkpoint_steps import best_step

        return best_step(self.run_dir, self.monitor_metric, self.monitor_mode)

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise the error of a finished background save, once."""
        if self._errors:
            raise self._errors.pop(0)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait_until_finished(self) -> None:
        self._join()
        self.check()

    def close(self, raise_errors: bool = True) -> None:
        try:
            self.wait_until_finished()
        except BaseException:
            if raise_errors:
                raise
            log.exception("the last checkpoint save failed")
