"""The commit protocol: a folder becomes a checkpoint only when its manifest says so.

Files are written into a temporary sibling folder, hashed while they are written and
fsynced; `MANIFEST.json` (every file's size and hash) is written last and fsynced; the
folder is renamed into place and the parent fsynced. A folder whose manifest is missing,
unreadable, or does not match its files is not a checkpoint, so even where rename is
not atomic (Drive's FUSE mount, network filesystems) a partial copy is never taken.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import xxhash

MANIFEST_NAME = "MANIFEST.json"
FORMAT_VERSION = 1
HASH_ALGORITHM = "xxh3_128"
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
MAX_JSON_BYTES = 64 * 1024 * 1024  # a manifest or state JSON larger than this is not ours
CHUNK_BYTES = 64 * 1024 * 1024


class CheckpointError(Exception):
    """Base of checkpoint failures. `path` is the file or folder concerned, `fix` the remedy."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path}: {reason}" + (f" ({fix})" if fix else ""))


class CheckpointCorrupt(CheckpointError):
    """A folder is not a complete, intact checkpoint."""


class UnsupportedFormat(CheckpointCorrupt):
    """Written by a newer format version than this package reads."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, permission, I/O error); the previous checkpoints are intact."""


def new_hasher() -> Any:
    return xxhash.xxh3_128()


class HashingWriter:
    """A binary file that hashes and counts what it writes, and fsyncs on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._hasher = new_hasher()
        self.size_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = view[start : start + CHUNK_BYTES]
            self._hasher.update(chunk)
            written = 0
            while written < len(chunk):  # raw writes may be short
                written += self._file.write(chunk[written:])
        self.size_bytes += len(view)
        return len(view)

    def flush(self) -> None:
        pass  # unbuffered; durability comes from fsync in close()

    def close(self) -> dict[str, Any]:
        try:
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        return {"size_bytes": self.size_bytes, "hash": self._hasher.hexdigest()}

    def abort(self) -> None:
        self._file.close()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems (and Windows) cannot open a folder; nothing more to do
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync of a directory is unsupported on some FUSE mounts; the manifest rule still holds
    finally:
        os.close(fd)


def write_json_file(path: Path, data: Any) -> dict[str, Any]:
    writer = HashingWriter(path)
    try:
        writer.write(json.dumps(data, indent=1, sort_keys=True, allow_nan=True).encode("utf-8"))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def new_temp_dir(parent: Path, final_name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TEMP_PREFIX}{final_name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def write_manifest(folder: Path, files: dict[str, dict[str, Any]], **fields: Any) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "hash_algorithm": HASH_ALGORITHM,
        "created_at": time.time(),
        **fields,
        "files": files,
    }
    write_json_file(folder / MANIFEST_NAME, manifest)
    fsync_dir(folder)


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place. An existing folder of that name (a damaged
    leftover of an earlier save at the same step) is moved aside first, then removed."""
    trash = None
    if final.exists() or final.is_symlink():
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}-{secrets.token_hex(4)}")
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        remove_tree(trash)


def remove_tree(path: Path) -> None:
    """Delete a checkpoint folder: the manifest goes first, so a half-deleted folder is
    never mistaken for a checkpoint."""
    try:
        (path / MANIFEST_NAME).unlink(missing_ok=True)
    except OSError:
        pass  # the rmtree below reports what matters
    shutil.rmtree(path, ignore_errors=True)


def _read_small_json(path: Path, what: str) -> Any:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointCorrupt(path, f"{what} is missing", "this save did not finish; use an older checkpoint")
    except OSError as exc:
        raise CheckpointCorrupt(path, f"cannot stat {what}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointCorrupt(path, f"{what} is not a regular file (symlink or special file refused)")
    if st.st_size > MAX_JSON_BYTES:
        raise CheckpointCorrupt(path, f"{what} is {st.st_size} bytes, larger than any this package writes")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        return json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise CheckpointCorrupt(path, f"cannot read {what}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointCorrupt(path, f"{what} is not valid JSON ({type(exc).__name__})") from exc


def read_json(path: Path, what: str) -> Any:
    return _read_small_json(Path(path), what)


def _safe_member(folder: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise CheckpointCorrupt(folder, f"manifest names an invalid file {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CheckpointCorrupt(folder, f"manifest names a file outside the checkpoint: {name!r}")
    return folder.joinpath(*parts)


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and validate MANIFEST.json (structure only; sizes and hashes are checked elsewhere)."""
    folder = Path(folder)
    manifest = _read_small_json(folder / MANIFEST_NAME, MANIFEST_NAME)
    if not isinstance(manifest, dict):
        raise CheckpointCorrupt(folder, "manifest is not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointCorrupt(folder, "manifest has no integer format_version")
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            folder,
            f"written by format version {version}; this package reads up to {FORMAT_VERSION}",
            "upgrade the package to load it",
        )
    if manifest.get("hash_algorithm") != HASH_ALGORITHM:
        raise CheckpointCorrupt(folder, f"unknown hash algorithm {manifest.get('hash_algorithm')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointCorrupt(folder, "manifest lists no files")
    for name, entry in files.items():
        _safe_member(folder, name)
        if name == MANIFEST_NAME:
            raise CheckpointCorrupt(folder, "manifest lists itself")
        if not isinstance(entry, dict):
            raise CheckpointCorrupt(folder, f"manifest entry for {name!r} is not an object")
        size, digest = entry.get("size_bytes"), entry.get("hash")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CheckpointCorrupt(folder, f"manifest entry for {name!r} has no valid size_bytes")
        if not isinstance(digest, str) or len(digest) != 32:
            raise CheckpointCorrupt(folder, f"manifest entry for {name!r} has no valid hash")
    return manifest


def _check_member_stat(folder: Path, name: str, entry: dict[str, Any]) -> Path:
    path = _safe_member(folder, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointCorrupt(path, f"{name} listed in the manifest is missing") from None
    except OSError as exc:
        raise CheckpointCorrupt(path, f"cannot stat {name}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointCorrupt(path, f"{name} is not a regular file (symlinks are refused)")
    if st.st_size != entry["size_bytes"]:
        raise CheckpointCorrupt(
            path, f"{name} is {st.st_size} bytes, the manifest says {entry['size_bytes']} (truncated or partial)"
        )
    return path


def cheap_check(folder: Path) -> dict[str, Any]:
    """Manifest present and valid, every file present with its recorded size. Reads no data
    beyond the manifest; returns the manifest. Raises CheckpointCorrupt."""
    folder = Path(folder)
    if folder.is_symlink():
        raise CheckpointCorrupt(folder, "checkpoint folder is a symlink (refused)")
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        _check_member_stat(folder, name, entry)
    return manifest


def verify(folder: Path) -> dict[str, Any]:
    """Full integrity check: cheap_check plus every file's hash. Returns the manifest."""
    folder = Path(folder)
    manifest = cheap_check(folder)
    for name, entry in manifest["files"].items():
        path = _safe_member(folder, name)
        hasher = new_hasher()
        try:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(CHUNK_BYTES):
                    hasher.update(chunk)
        except OSError as exc:
            raise CheckpointCorrupt(path, f"cannot read {name}: {exc.strerror}") from exc
        if hasher.hexdigest() != entry["hash"]:
            raise CheckpointCorrupt(path, f"{name} does not match its hash in the manifest (corrupted bytes)")
    return manifest
