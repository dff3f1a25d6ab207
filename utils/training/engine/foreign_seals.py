"""Seals for checkpoints that Hugging Face Trainer or PyTorch Lightning wrote: write, check, find the newest.

A Hugging Face `checkpoint-N/` folder gets our `MANIFEST.json` (every file's size and hash,
written last and fsynced, through `commit.write_manifest`) after the framework has written
it; a Lightning `<name>.ckpt` file gets a `<name>.ckpt.manifest.json` beside it that also
records the checkpoint's `global_step`. A checkpoint without a seal that matches its bytes is
never offered for a resume. Nothing here imports torch or a framework: recovery reads these
folders too, and it stays metadata only.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from .commit import (
    MANIFEST_NAME,
    TEMP_PREFIX,
    CheckpointCorrupt,
    cheap_check,
    fsync_dir,
    hash_file,
    read_manifest,
    verify,
    write_manifest,
)

HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
CKPT_SUFFIX = ".ckpt"
SEAL_SUFFIX = ".manifest.json"  # <name>.ckpt.manifest.json beside <name>.ckpt
ABANDONED_DIR = "abandoned"
SEALED_BY = "training-survives"


class NotSealed(CheckpointCorrupt):
    """A framework checkpoint has no seal of ours: its save was interrupted, or it was written
    without SealCheckpoints, so nothing vouches that it is complete or that it is ours."""


# -- Hugging Face: checkpoint-N/ folders ------------------------------------------------------
def hf_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The `checkpoint-N` folders of a Hugging Face output_dir, highest N first."""
    try:
        entries = list(Path(output_dir).iterdir())
    except OSError:
        return []
    found = [(int(m.group(1)), e) for e in entries if (m := HF_CHECKPOINT.match(e.name)) and e.is_dir()]
    return sorted(found, key=lambda item: (item[0], item[1].name), reverse=True)


def _regular_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` by relative POSIX path; symlinks and special files are listed too,
    so a check can refuse them."""
    found: dict[str, Path] = {}
    for root, dirnames, names in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder)
        for name in names + [d for d in dirnames if os.path.islink(os.path.join(root, d))]:
            found[(rel_root / name).as_posix()] = Path(root) / name
    return found


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def seal_hf_checkpoint(folder: str | os.PathLike, global_step: int) -> dict[str, Any]:
    """Seal a `checkpoint-N/` folder the framework has finished writing: fsync every file
    (the framework does not), hash it, write MANIFEST.json last, fsync the folder and its
    parent. Returns the manifest's file table. Raises OSError or CheckpointCorrupt."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointCorrupt(folder, "is not a checkpoint folder (missing, or a symlink)")
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # a stale seal of an earlier save at this step
    files: dict[str, dict[str, Any]] = {}
    for name, path in sorted(_regular_files(folder).items()):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise CheckpointCorrupt(path, f"{name} is not a regular file (symlinks are never sealed)")
        _fsync_file(path)
        files[name] = hash_file(path)
    for root, _, _ in os.walk(folder):
        fsync_dir(Path(root))
    write_manifest(folder, files, global_step=int(global_step), framework="huggingface", sealed_by=SEALED_BY)
    fsync_dir(folder.parent)
    return files


def check_hf_checkpoint(folder: str | os.PathLike, *, full: bool = True) -> dict[str, Any]:
    """The seal of one `checkpoint-N/` folder, checked: present and intact, every listed file
    at its size (and, with `full`, its hash), no unlisted file, the step in its name equal to
    the sealed one. Returns the manifest; raises NotSealed or CheckpointCorrupt with the reason."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).exists() and not (folder / MANIFEST_NAME).is_symlink():
        raise NotSealed(
            folder,
            "not sealed (no MANIFEST.json): its save was interrupted, or it was written without SealCheckpoints",
            "resume from an older sealed checkpoint",
        )
    manifest = verify(folder) if full else cheap_check(folder)
    unlisted = sorted(set(_regular_files(folder)) - set(manifest["files"]) - {MANIFEST_NAME})
    if unlisted:
        raise CheckpointCorrupt(folder, f"holds files its seal does not list: {', '.join(unlisted[:5])}")
    match = HF_CHECKPOINT.match(folder.name)
    sealed_step = manifest.get("global_step")
    if match and sealed_step != int(match.group(1)):
        raise CheckpointCorrupt(
            folder, f"the folder name says step {match.group(1)} but its seal says step {sealed_step}"
        )
    return manifest


def scan_hf_checkpoints(
    output_dir: str | os.PathLike, *, full: bool = True
) -> tuple[Path | None, list[dict[str, str]]]:
    """(the newest `checkpoint-N` whose seal checks, every folder passed over with its reason)."""
    skipped: list[dict[str, str]] = []
    for _, folder in hf_checkpoints(output_dir):
        try:
            check_hf_checkpoint(folder, full=full)
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(folder), "reason": exc.reason})
            continue
        return folder, skipped
    return None, skipped


def set_aside_hf_checkpoints_after(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move every `checkpoint-N` with N > `step` (a future the resume abandoned: interrupted,
    damaged, or past an explicit rollback) into `<output_dir>/abandoned/<UTC>/`, so the
    framework never writes into a folder that still holds another save's files. Never deletes."""
    later = [folder for n, folder in hf_checkpoints(output_dir) if n > step]
    if not later:
        return []
    batch = Path(output_dir) / ABANDONED_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    batch.mkdir(parents=True, exist_ok=True)
    moved = []
    for folder in later:
        target = batch / folder.name
        while target.exists():
            target = batch / f"{folder.name}-{time.time_ns()}"
        os.rename(folder, target)
        moved.append(target)
    fsync_dir(batch)
    fsync_dir(Path(output_dir))
    return moved


# -- Lightning: <name>.ckpt files --------------------------------------------------------------
def seal_path(ckpt: str | os.PathLike) -> Path:
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.name + SEAL_SUFFIX)


def remove_seal(ckpt: str | os.PathLike) -> None:
    """Remove the seal of a checkpoint file that is about to be replaced or deleted, durably, so
    no seal ever stands beside bytes it did not hash."""
    seal = seal_path(ckpt)
    if seal.exists() or seal.is_symlink():
        seal.unlink()
        fsync_dir(seal.parent)


def temp_ckpt_path(ckpt: str | os.PathLike) -> Path:
    ckpt = Path(ckpt)
    return ckpt.with_name(f"{TEMP_PREFIX}{ckpt.name}-{os.getpid()}-{time.time_ns()}")


def commit_lightning_file(tmp: str | os.PathLike, final: str | os.PathLike, global_step: int) -> None:
    """Commit a checkpoint file written at `tmp`: fsync it, hash it, rename it into place (the
    seal of a file it replaces removed first), fsync the folder, then write the seal last."""
    tmp, final = Path(tmp), Path(final)
    _fsync_file(tmp)
    entry = hash_file(tmp)
    remove_seal(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    write_manifest(
        final.parent,
        {final.name: entry},
        manifest_name=seal_path(final).name,
        global_step=int(global_step),
        framework="lightning",
        sealed_by=SEALED_BY,
    )


def check_lightning_checkpoint(ckpt: str | os.PathLike, *, full: bool = True) -> dict[str, Any]:
    """The seal of one `.ckpt` file, checked (its size and, with `full`, its hash). Returns the
    manifest (with `global_step`); raises NotSealed or CheckpointCorrupt with the reason."""
    ckpt = Path(ckpt)
    seal = seal_path(ckpt)
    if not seal.exists() and not seal.is_symlink():
        raise NotSealed(
            ckpt,
            f"not sealed (no {seal.name}): its save was interrupted, or it was written without SealCheckpoints",
            "resume from an older sealed checkpoint",
        )
    manifest = read_manifest(ckpt.parent, manifest_name=seal.name)
    if set(manifest["files"]) != {ckpt.name}:
        raise CheckpointCorrupt(seal, f"{seal.name} seals {sorted(manifest['files'])}, not {ckpt.name}")
    step = manifest.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointCorrupt(seal, f"{seal.name} records no valid global_step")
    entry = manifest["files"][ckpt.name]
    try:
        st = os.lstat(ckpt)
    except FileNotFoundError:
        raise CheckpointCorrupt(ckpt, "the checkpoint file its seal names is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointCorrupt(ckpt, "is not a regular file (symlinks are refused)")
    if st.st_size != entry["size_bytes"]:
        raise CheckpointCorrupt(
            ckpt, f"is {st.st_size} bytes, its seal says {entry['size_bytes']} (truncated or partial)"
        )
    if full and hash_file(ckpt)["hash"] != entry["hash"]:
        raise CheckpointCorrupt(ckpt, "does not match its hash in the seal (corrupted bytes)")
    return manifest


def lightning_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The `.ckpt` files directly in `folder` (temporary files of unfinished saves excluded)."""
    try:
        return sorted(
            p for p in Path(folder).iterdir() if p.name.endswith(CKPT_SUFFIX) and not p.name.startswith(TEMP_PREFIX)
        )
    except OSError:
        return []


def scan_lightning_checkpoints(
    folder: str | os.PathLike, *, full: bool = True
) -> tuple[Path | None, int | None, list[dict[str, str]]]:
    """(the sealed `.ckpt` with the highest global_step, that step, every file passed over with
    its reason). Ties (last.ckpt and the step's own file) go to the name sorting last."""
    best: tuple[int, str, Path] | None = None
    skipped: list[dict[str, str]] = []
    for ckpt in lightning_checkpoints(folder):
        try:
            step = check_lightning_checkpoint(ckpt, full=full)["global_step"]
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(ckpt), "reason": exc.reason})
            continue
        if best is None or (step, ckpt.name) > best[:2]:
            best = (step, ckpt.name, ckpt)
    return (best[2], best[0], skipped) if best else (None, None, skipped)
