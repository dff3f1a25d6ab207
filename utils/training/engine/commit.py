"""The commit protocol: a folder becomes a checkpoint only when its manifest says so.

Files are written into a temporary sibling folder, hashed while they are written and
fsynced; `MANIFEST.json` (every file's size and hash) is written last and fsynced; the
folder is renamed into place and the parent fsynced. A folder whose manifest is missing,
unreadable, or does not match its files is not a checkpoint, so even where rename is
not atomic (Drive's FUSE mount, network filesystems) a partial copy is never taken.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .integrity import (  # noqa: F401 - the checking side lives there; re-exported for callers of commit
    _UNSEALED,
    CHUNK_BYTES,
    DCP_DIR,
    FORMAT_VERSION,
    HASH_ALGORITHM,
    MANIFEST_HASH_KEY,
    MANIFEST_NAME,
    MAX_JSON_BYTES,
    STEP_DIR_PREFIX,
    CheckpointCorrupt,
    CheckpointError,
    UnsupportedFormat,
    _hash_field,
    bytes_digest,
    cheap_check,
    hash_file,
    new_hasher,
    parse_json,
    read_capped,
    read_json,
    read_manifest,
    read_small_file,
    remember_verified,
    unlisted_files,
    verify,
    verify_cached,
)

TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
ABANDONED_DIR = "abandoned"  # <run>/abandoned/<UTC YYYYMMDDTHHMMSSZ>/: set aside, never deleted
# errno values meaning "this filesystem cannot fsync a folder": the only ones fsync_dir ignores.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}
SMALL_WRITE_BYTES = 1024 * 1024


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, permission, I/O error); the previous checkpoints are intact."""


class CheckpointExists(CheckpointWriteError):
    """A verified checkpoint already holds this step's name; it is kept, the new save is not committed."""


class RemoveFailed(CheckpointError):
    """A folder could not be deleted completely; `path` is what is left."""


class HashingWriter:
    """A binary file that hashes and counts what it writes, and fsyncs on close.

    Small writes (torch.save emits hundreds per file) are gathered into SMALL_WRITE_BYTES
    before they reach the hash and the kernel; large ones (tensor data) go straight through.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._hasher = new_hasher()
        self._pending = bytearray()
        self.size_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if len(self._pending) + size <= SMALL_WRITE_BYTES:
            self._pending += view
        else:
            self._drain()
            if size <= SMALL_WRITE_BYTES:
                self._pending += view
            else:
                self._write_through(view)
        self.size_bytes += size
        return size

    def _drain(self) -> None:
        if self._pending:
            self._write_through(memoryview(self._pending))
            self._pending = bytearray()

    def _write_through(self, view: memoryview) -> None:
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = view[start : start + CHUNK_BYTES]
            self._hasher.update(chunk)
            written = 0
            while written < len(chunk):  # raw writes may be short
                written += self._file.write(chunk[written:])

    def flush(self) -> None:
        pass  # data reaches the file in close() at the latest; durability comes from its fsync

    def close(self) -> dict[str, Any]:
        try:
            self._drain()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        return {"size_bytes": self.size_bytes, "hash": self._hasher.hexdigest()}

    def abort(self) -> None:
        self._file.close()


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename in it is durable. Only "not supported" errors (EINVAL,
    ENOTSUP, EBADF: platforms and FUSE mounts that cannot fsync a folder) are ignored; any
    other error (EIO: a failed write-back) is raised."""
    if os.name == "nt":
        return  # Windows cannot open a folder; NTFS journals the rename itself
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def subfolders(path: Path) -> list[Path]:
    """The real folders in `path` (symlinks and hidden names left out), in listing order; none
    when it cannot be listed. From the listing's entry types: no stat per entry."""
    try:
        with os.scandir(path) as listing:
            return [
                Path(entry.path)
                for entry in listing
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []


def encode_json(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True, allow_nan=True).encode("utf-8")


def write_json_file(path: Path, data: Any) -> dict[str, Any]:
    """Write `data` (a dict, or bytes from encode_json) as a hashed, fsynced JSON file."""
    writer = HashingWriter(path)
    try:
        writer.write(data if isinstance(data, bytes) else encode_json(data))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def new_temp_dir(parent: Path, final_name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TEMP_PREFIX}{final_name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def write_manifest(
    folder: Path, files: dict[str, dict[str, Any]], *, manifest_name: str = MANIFEST_NAME, **fields: Any
) -> None:
    """Write MANIFEST.json (or `manifest_name`, for a seal beside a single file) sealed with the
    hash of its own bytes (taken with the hash field zeroed), so that any flipped byte in it is
    caught, even one that leaves valid JSON."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "hash_algorithm": HASH_ALGORITHM,
        "created_at": time.time(),
        **fields,
        "files": files,
        MANIFEST_HASH_KEY: _UNSEALED.decode(),
    }
    raw = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=True).encode("utf-8")
    raw = raw.replace(_hash_field(_UNSEALED), _hash_field(bytes_digest(raw).encode()), 1)
    writer = HashingWriter(folder / manifest_name)
    try:
        writer.write(raw)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    fsync_dir(folder)


def utc_stamp(when: float | None = None) -> str:
    """A UTC time as YYYYMMDDTHHMMSSZ: the name of one `abandoned/` batch."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when is None else when))


def set_aside(path: Path, batch_dir: Path) -> Path:
    """Move `path` into `batch_dir` (created; e.g. <run>/abandoned/<UTC>/) under its own name,
    durably (both folders fsynced). Nothing is deleted. Returns the new path."""
    path, batch_dir = Path(path), Path(batch_dir)
    batch_dir.mkdir(parents=True, exist_ok=True)
    target = batch_dir / path.name
    if target.exists() or target.is_symlink():
        target = batch_dir / f"{path.name}-{secrets.token_hex(4)}"
    os.rename(path, target)
    fsync_dir(batch_dir)
    fsync_dir(path.parent)
    return target


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place. A folder of that name that verifies is never
    touched: CheckpointExists is raised and the new save is not committed. One that does not
    verify (a damaged leftover of an earlier save at the same step) is set aside into
    `abandoned/<UTC>/`, never deleted, and only then is the new one renamed in: a crash
    between the two renames leaves the old one in abandoned/ and the new one complete in
    its temp folder."""
    tmp, final = Path(tmp), Path(final)
    if final.exists() or final.is_symlink():
        try:
            verify(final)
        except CheckpointCorrupt as exc:
            if final.is_symlink():
                final.unlink()  # a link is not a checkpoint; its target is never touched
            else:
                set_aside(final, final.parent / ABANDONED_DIR / utc_stamp())
            del exc
        else:
            raise CheckpointExists(
                final,
                "a checkpoint that verifies already has this name; it is kept and this save was not committed",
                "resume from it, or move it away yourself",
            )
    os.rename(tmp, final)
    fsync_dir(final.parent)
    try:
        remember_verified(final, read_manifest(final))  # hashed while written: no re-read needed
    except CheckpointCorrupt:
        pass  # verify_cached will hash it


def remove_tree(path: Path, *, strict: bool = False) -> list[str]:
    """Delete a checkpoint folder. It is first renamed to a `.trash-` sibling (atomic where
    rename is), so a crash never leaves a half-deleted folder under a checkpoint's name (the
    next trainer clears the trash); then the manifest goes first, so where rename is not
    atomic a half-deleted folder is still never mistaken for a checkpoint. A symlink is
    unlinked, never followed. Returns what could not be deleted ("path: reason"); with
    strict=True, raises RemoveFailed instead."""
    path = Path(path)
    failures: list[str] = []
    if path.is_symlink():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            failures.append(f"{path}: {exc.strerror or exc}")
        return _report(path, failures, strict)
    if not path.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")
        try:
            os.rename(path, trash)
            path = trash
        except FileNotFoundError:
            return []
        except OSError:
            pass  # delete in place, manifest first
    try:
        (path / MANIFEST_NAME).unlink(missing_ok=True)
    except OSError:
        pass  # the rmtree below reports what matters

    def on_error(_func: Any, failed: str, exc_info: Any) -> None:
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if not isinstance(exc, FileNotFoundError):
            failures.append(f"{failed}: {getattr(exc, 'strerror', None) or exc}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=on_error)
    else:
        shutil.rmtree(path, onerror=on_error)
    return _report(path, failures, strict)


def _report(path: Path, failures: list[str], strict: bool) -> list[str]:
    if failures and strict:
        raise RemoveFailed(path, f"could not delete: {failures[0]}", "check permissions; delete it by hand")
    return failures
