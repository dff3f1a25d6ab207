"""Checking a checkpoint folder: its sealed manifest, the cheap check, every hash, and what it does not list.

A folder is a checkpoint only when `MANIFEST.json` (written last by `commit.py`) parses, is
sealed by the hash of its own bytes, and every file it lists is present with its size (the
cheap check) and, for the full check, its hash. A `step-NNNNNN` folder whose name and
manifest disagree on the step, or that holds a `dcp/` its manifest does not list, is not
one. Files a manifest does not list are never loaded; `unlisted_files` names them.
"""

from __future__ import annotations

import json
import os
import stat
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

STEP_DIR_PREFIX = "step-"

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


def new_hasher() -> Any:
    return xxhash.xxh3_128()


_UNSEALED = b"0" * 32


def _hash_field(digest: bytes) -> bytes:
    return b'"' + MANIFEST_HASH_KEY.encode() + b'": "' + digest + b'"'


def bytes_digest(raw: bytes) -> str:
    hasher = new_hasher()
    hasher.update(raw)
    return hasher.hexdigest()


def _is_sealed(raw: bytes, manifest: dict[str, Any]) -> bool:
    recorded = manifest.get(MANIFEST_HASH_KEY)
    if not isinstance(recorded, str) or len(recorded) != 32 or not recorded.isascii():
        return False
    field = _hash_field(recorded.encode())
    return raw.count(field) == 1 and bytes_digest(raw.replace(field, _hash_field(_UNSEALED))) == recorded


_VERIFIED: dict[str, tuple] = {}  # folder -> stat identity of its files when last seen intact


def _identity(folder: Path, manifest: dict[str, Any]) -> tuple:
    items = []
    for name in sorted(manifest["files"]):
        st = os.lstat(_safe_member(folder, name))
        items.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    st = os.lstat(folder / MANIFEST_NAME)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, tuple(items))


def remember_verified(folder: Path, manifest: dict[str, Any]) -> None:
    """Record that `folder` holds exactly the bytes its manifest hashes (just written, or just
    hashed), keyed by its files' inode, size, mtime and ctime, so a later `verify_cached`
    re-hashes only a folder whose files changed since."""
    try:
        _VERIFIED[str(Path(folder).absolute())] = _identity(Path(folder), manifest)
    except (OSError, CheckpointCorrupt):
        _VERIFIED.pop(str(Path(folder).absolute()), None)


def verify_cached(folder: Path) -> dict[str, Any]:
    """`verify`, skipping the hashing when no file of the folder changed since it was last
    verified or written by this process. Raises CheckpointCorrupt."""
    folder = Path(folder)
    manifest = cheap_check(folder)
    key = str(folder.absolute())
    try:
        same = _VERIFIED.get(key) == _identity(folder, manifest)
    except OSError:
        same = False
    if same:
        return manifest
    _VERIFIED.pop(key, None)
    manifest = verify(folder)
    remember_verified(folder, manifest)
    return manifest


def parse_json(path: Path, what: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointCorrupt(path, f"{what} is not valid JSON ({type(exc).__name__})") from exc


def read_capped(path: str | os.PathLike, cap: int, *, size: int | None = None, nofollow: bool = False) -> bytes:
    """A file's bytes, or its first cap + 1 when it is larger (so that the caller can refuse it).
    Straight system calls (open, read to the end, close), not a buffered file object, which adds
    an fstat, an ioctl and a seek to every small read. Sized from `size` (the stat the caller
    just took) or fstat, not from the cap: a read of `cap` bytes would allocate that much up
    front (64 MiB for a 3 KB manifest). A file that grew after the stat is read on to the cap.
    nofollow: a symlink is refused (OSError ELOOP). Raises OSError."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | (getattr(os, "O_NOFOLLOW", 0) if nofollow else 0))
    try:
        want = min(os.fstat(fd).st_size if size is None else size, cap) + 1
        chunks: list[bytes] = []
        total = 0
        while total <= cap:
            chunk = os.read(fd, (want if total < want else cap + 1) - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


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
    try:  # nofollow: a symlink swapped in after the lstat is refused too
        return read_capped(path, MAX_JSON_BYTES, size=st.st_size, nofollow=True)
    except OSError as exc:
        raise CheckpointCorrupt(path, f"cannot read {what}: {exc.strerror}") from exc


def read_json(path: Path, what: str) -> Any:
    """A small JSON file of ours: size-capped, symlinks refused, any damage a CheckpointCorrupt."""
    return parse_json(Path(path), what, read_small_file(Path(path), what))


def _safe_member(folder: Path, name: Any) -> Path:
    _check_member_name(folder, name)
    return folder.joinpath(*name.split("/"))


def _check_member_name(folder: Path, name: Any) -> None:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise CheckpointCorrupt(folder, f"manifest names an invalid file {name!r}")
    try:
        os.fsencode(name)
    except UnicodeError:
        raise CheckpointCorrupt(folder, f"manifest names a file no filesystem can hold: {name!r}") from None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CheckpointCorrupt(folder, f"manifest names a file outside the checkpoint: {name!r}")


def read_manifest(folder: Path, manifest_name: str = MANIFEST_NAME) -> dict[str, Any]:
    """Parse and validate MANIFEST.json (structure only; sizes and hashes are checked elsewhere)."""
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
        _check_member_name(folder, name)
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


def _check_member_stat(folder: Path, name: str, entry: dict[str, Any]) -> None:
    path = f"{folder}{os.sep}{name}"  # name checked by read_manifest; a string, not a Path: this runs per file
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


DCP_DIR = "dcp"  # a distributed checkpoint's shards (dist_checkpoint.py)


def _check_name_matches_step(folder: Path, manifest: dict[str, Any]) -> None:
    name = folder.name
    digits = name[len(STEP_DIR_PREFIX) :]
    if not (name.startswith(STEP_DIR_PREFIX) and len(digits) >= 6 and digits.isdigit()):
        return
    step = manifest.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and step != int(digits):
        raise CheckpointCorrupt(
            folder,
            f"the folder name says step {int(digits)} but its manifest says step {step} (a copied or renamed folder)",
            f"rename it back to {STEP_DIR_PREFIX}{step:06d} or move it out of the run folder",
        )


def _check_no_unlisted_dcp(folder: Path, manifest: dict[str, Any]) -> None:
    listed = any(name.startswith(DCP_DIR + "/") for name in manifest["files"])
    if not listed and os.path.lexists(folder / DCP_DIR):
        raise CheckpointCorrupt(
            folder / DCP_DIR,
            f"{DCP_DIR}/ is not listed in the manifest of this single-process checkpoint (planted or foreign files)",
            f"delete {folder / DCP_DIR}; nothing in it is ever loaded",
        )


def unlisted_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Files (relative paths) inside a checkpoint folder that its manifest does not list.
    Nothing unlisted is ever loaded; `verify` reports them as warnings."""
    folder = Path(folder)
    listed = set(manifest["files"]) | {MANIFEST_NAME}
    found = []
    for root, dirnames, names in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder)
        for name in names + [d for d in dirnames if os.path.islink(os.path.join(root, d))]:
            rel = (rel_root / name).as_posix()
            if rel not in listed:
                found.append(rel)
    return sorted(found)


def cheap_check(folder: Path) -> dict[str, Any]:
    """Manifest present and valid, every file present with its recorded size, the step in a
    `step-NNNNNN` name equal to the manifest's, no unlisted `dcp/`. Reads no data beyond the
    manifest; returns the manifest. Raises CheckpointCorrupt."""
    folder = Path(folder)
    if folder.is_symlink():
        raise CheckpointCorrupt(folder, "checkpoint folder is a symlink (refused)")
    manifest = read_manifest(folder)
    _check_name_matches_step(folder, manifest)
    for name, entry in manifest["files"].items():
        _check_member_stat(folder, name, entry)
    _check_no_unlisted_dcp(folder, manifest)
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
