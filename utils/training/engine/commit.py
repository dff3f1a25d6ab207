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
# 2: the manifest carries a hash of its own content, so a flipped byte in it is caught too.
# 3: the training state is training_state.safetensors (tensors + a JSON structure) instead of
# torch.save's training_state.pt. Version 1 manifests (no self-hash) and version 2 checkpoints
# (training_state.pt, read with torch.load(weights_only=True)) are still read.
FORMAT_VERSION = 3
MANIFEST_HASH_KEY = "manifest_hash"
HASH_ALGORITHM = "xxh3_128"
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
MAX_JSON_BYTES = 64 * 1024 * 1024  # a manifest or state JSON larger than this is not ours
CHUNK_BYTES = 64 * 1024 * 1024
SMALL_WRITE_BYTES = 1024 * 1024


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


_UNSEALED = b"0" * 32


def _hash_field(digest: bytes) -> bytes:
    return b'"' + MANIFEST_HASH_KEY.encode() + b'": "' + digest + b'"'


def bytes_digest(raw: bytes) -> str:
    hasher = new_hasher()
    hasher.update(raw)
    return hasher.hexdigest()


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


def _is_sealed(raw: bytes, manifest: dict[str, Any]) -> bool:
    recorded = manifest.get(MANIFEST_HASH_KEY)
    if not isinstance(recorded, str) or len(recorded) != 32 or not recorded.isascii():
        return False
    field = _hash_field(recorded.encode())
    return raw.count(field) == 1 and bytes_digest(raw.replace(field, _hash_field(_UNSEALED))) == recorded


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
    """Delete a checkpoint folder. It is first renamed to a `.trash-` sibling (atomic where
    rename is), so a crash never leaves a half-deleted folder under a checkpoint's name (the
    next trainer clears the trash); then the manifest goes first, so where rename is not
    atomic a half-deleted folder is still never mistaken for a checkpoint. A symlink is
    unlinked, never followed."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass  # gone already, or not ours to remove: the target is never touched
        return
    if not path.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")
        try:
            os.rename(path, trash)
            path = trash
        except OSError:
            pass  # delete in place, manifest first
    try:
        (path / MANIFEST_NAME).unlink(missing_ok=True)
    except OSError:
        pass  # the rmtree below reports what matters
    shutil.rmtree(path, ignore_errors=True)


def parse_json(path: Path, what: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointCorrupt(path, f"{what} is not valid JSON ({type(exc).__name__})") from exc


def read_small_file(path: Path, what: str) -> bytes:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointCorrupt(
            path, f"{what} is missing", "this save did not finish; use an older checkpoint"
        ) from None
    except OSError as exc:
        raise CheckpointCorrupt(path, f"cannot stat {what}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointCorrupt(path, f"{what} is not a regular file (symlink or special file refused)")
    if st.st_size > MAX_JSON_BYTES:
        raise CheckpointCorrupt(path, f"{what} is {st.st_size} bytes, larger than any this package writes")
    try:
        with open(path, "rb") as f:
            return f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CheckpointCorrupt(path, f"cannot read {what}: {exc.strerror}") from exc


def read_json(path: Path, what: str) -> Any:
    """A small JSON file of ours: size-capped, symlinks refused, any damage a CheckpointCorrupt."""
    return parse_json(Path(path), what, read_small_file(Path(path), what))


def _safe_member(folder: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise CheckpointCorrupt(folder, f"manifest names an invalid file {name!r}")
    try:
        os.fsencode(name)
    except UnicodeError:
        raise CheckpointCorrupt(folder, f"manifest names a file no filesystem can hold: {name!r}") from None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CheckpointCorrupt(folder, f"manifest names a file outside the checkpoint: {name!r}")
    return folder.joinpath(*parts)


def read_manifest(folder: Path, manifest_name: str = MANIFEST_NAME) -> dict[str, Any]:
    """Parse and validate MANIFEST.json, or the seal `manifest_name` in `folder` (structure
    only; sizes and hashes are checked elsewhere)."""
    folder = Path(folder)
    raw = read_small_file(folder / manifest_name, manifest_name)
    manifest = parse_json(folder / manifest_name, manifest_name, raw)
    if not isinstance(manifest, dict):
        raise CheckpointCorrupt(folder, "manifest is not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointCorrupt(folder, "manifest has no integer format_version")
    if version < 1:
        raise CheckpointCorrupt(folder, f"manifest has an invalid format_version {version}")
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
        if name in (MANIFEST_NAME, manifest_name):
            raise CheckpointCorrupt(folder, "manifest lists itself")
        if not isinstance(entry, dict):
            raise CheckpointCorrupt(folder, f"manifest entry for {name!r} is not an object")
        size, digest = entry.get("size_bytes"), entry.get("hash")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CheckpointCorrupt(folder, f"manifest entry for {name!r} has no valid size_bytes")
        if not isinstance(digest, str) or len(digest) != 32:
            raise CheckpointCorrupt(folder, f"manifest entry for {name!r} has no valid hash")
    if version >= 2 and not _is_sealed(raw, manifest):
        raise CheckpointCorrupt(
            folder / manifest_name,
            f"{manifest_name} does not match its own hash (corrupted bytes)",
            "this checkpoint is damaged; use an older one",
        )
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


def hash_file(path: Path) -> dict[str, Any]:
    """Size and hash of a file already on disk, as a manifest entry records them. Raises OSError."""
    hasher = new_hasher()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return {"size_bytes": size, "hash": hasher.hexdigest()}


def verify(folder: Path) -> dict[str, Any]:
    """Full integrity check: cheap_check plus every file's hash. Returns the manifest."""
    folder = Path(folder)
    manifest = cheap_check(folder)
    for name, entry in manifest["files"].items():
        path = _safe_member(folder, name)
        try:
            digest = hash_file(path)["hash"]
        except OSError as exc:
            raise CheckpointCorrupt(path, f"cannot read {name}: {exc.strerror}") from exc
        if digest != entry["hash"]:
            raise CheckpointCorrupt(path, f"{name} does not match its hash in the manifest (corrupted bytes)")
    return manifest
