"""Which checkpoints a run has: listing, ranking by `saved_at`, the newest and best that verify, retention.

Torch-free (recovery imports it). "Newest" is ranked by the `saved_at` recorded inside each
checkpoint (not file mtimes, not the step in the name), ties broken by path; a folder whose
name and manifest disagree on the step is skipped with that reason (commit.cheap_check).
Retention, the newest and the best are chosen among checkpoints that verify: a damaged
folder never fills a keep slot, so a new checkpoint is never deleted to keep it.

Read-only callers (recovery) rank through `.checkpoint-index.json`, a cache that the saving
process rewrites after each commit: each entry holds what ranks one checkpoint (step,
saved_at, metrics) and the identity of the MANIFEST.json it was read from (inode, size,
mtime and ctime, in ns). An entry is used only while that identity is unchanged, which any
rewrite, replacement or copy of the manifest breaks (ctime cannot be set back by a user);
every other folder has its manifest read as without the index. Ranking stays exact and a
stale, damaged or missing index costs only speed. Folders taken from the index have not had
their files stat'ed: a caller checks the one it takes (recovery does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commit import (
    MANIFEST_NAME,
    TEMP_PREFIX,
    TRASH_PREFIX,
    CheckpointCorrupt,
    CheckpointError,
    UnsupportedFormat,
    cheap_check,
    read_json,
    remove_tree,
    verify_cached,
)
from .trainer_state import read_trainer_state

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
INDEX_FILE = ".checkpoint-index.json"
INDEX_FORMAT = 1


class NoCheckpointFound(CheckpointError):
    """No folder that passes the check exists where we looked."""


class CheckpointListingError(CheckpointError):
    """The run folder exists but cannot be listed (a FUSE mount's hiccup, permissions).
    This is not "no checkpoints": nothing may start over on it."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Committed-looking step folders of a run, highest step first (temp and trash folders
    excluded). A missing run folder has none; one that cannot be listed raises
    CheckpointListingError."""
    run_dir = Path(run_dir)
    return [(step, run_dir / name) for step, name in _step_names(run_dir)]


def _step_names(run_dir: Path) -> list[tuple[int, str]]:
    try:
        with os.scandir(run_dir) as listing:
            names = [entry.name for entry in listing]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CheckpointListingError(
            run_dir,
            f"cannot list the run folder: {exc.strerror or exc}",
            "check the mount or permissions and try again; nothing was changed",
        ) from exc
    found = []
    for name in names:
        match = STEP_DIR.match(name)
        if match:
            found.append((int(match.group(1)), name))
    return sorted(found, reverse=True)


def list_leftovers(run_dir: Path) -> list[Path]:
    """Temp folders of saves that never finished, and trash of interrupted deletes."""
    try:
        with os.scandir(run_dir) as listing:
            names = [entry.name for entry in listing if entry.name.startswith((TEMP_PREFIX, TRASH_PREFIX))]
    except OSError:
        return []
    return sorted(Path(run_dir) / name for name in names)


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint that passed the cheap check, with what ranks it."""

    run_dir: Path
    name: str
    step: int
    saved_at: float
    metrics: dict[str, Any] = field(repr=False, compare=False)
    manifest: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # None: taken from the index
    identity: list[int] | None = field(default=None, repr=False, compare=False)  # of its MANIFEST.json, for the index

    @property
    def path(self) -> Path:
        return self.run_dir / self.name

    def metric(self, name: str) -> float | None:
        value = self.metrics.get(name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None


def saved_at_field(trainer_state: dict[str, Any]) -> dict[str, float]:
    """The trainer state's `saved_at`, for the manifest too: ranking checkpoints then reads only
    their manifests (which the cheap check reads anyway), not every trainer_state.json."""
    value = trainer_state.get("saved_at")
    return {"saved_at": float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def checkpoint_saved_at(path: Path, manifest: dict[str, Any]) -> float:
    value = manifest.get("saved_at")  # in the sealed manifest since format 3's save path; else trainer_state.json
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        try:
            value = read_trainer_state(path, manifest).get("saved_at")
        except CheckpointCorrupt:
            value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        value = manifest.get("created_at")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def ranked_checkpoints(
    run_dir: Path, *, refuse_newer: bool = False, use_index: bool = False
) -> tuple[list[CheckpointEntry], list[dict[str, str]]]:
    """Checkpoints that pass the cheap check, newest first by saved_at (ties: by path), and
    the folders passed over with their reasons. With refuse_newer, a checkpoint written by a
    newer format version raises UnsupportedFormat instead of being passed over (a resume
    must not fall back past it and overwrite a newer version's work). With use_index, a
    folder whose manifest is unchanged since the index recorded it is ranked from the index
    (its files not stat'ed: see the module docstring)."""
    index = _read_index(run_dir) if use_index else {}
    entries: list[CheckpointEntry] = []
    skipped: list[dict[str, str]] = []
    run_dir = Path(run_dir)
    for step, name in _step_names(run_dir):
        identity = _manifest_identity(run_dir, name) if use_index else None  # taken before the read
        cached = index.get(name)
        if cached is not None and identity is not None and _index_entry_matches(cached, identity, step):
            entries.append(CheckpointEntry(run_dir, name, step, float(cached["saved_at"]), cached["metrics"],
                                           None, identity))  # fmt: skip
            continue
        path = run_dir / name
        try:
            manifest = cheap_check(path)
        except UnsupportedFormat:
            if refuse_newer:
                raise
            skipped.append({"path": str(path), "reason": "written by a newer format version"})
            continue
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(path), "reason": exc.reason})
            continue
        metrics = manifest.get("metrics")
        entries.append(CheckpointEntry(run_dir, name, step, checkpoint_saved_at(path, manifest),
                                       metrics if isinstance(metrics, dict) else {}, manifest, identity))  # fmt: skip
    entries.sort(key=lambda e: (e.saved_at, e.name), reverse=True)  # one run folder: the name orders as the path
    return entries, skipped


def _manifest_identity(run_dir: Path, name: str) -> list[int] | None:
    try:
        st = os.lstat(f"{run_dir}/{name}/{MANIFEST_NAME}")
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _index_entry_matches(item: Any, identity: list[int], step: int) -> bool:
    return (
        isinstance(item, dict)
        and item.get("sig") == identity
        and item.get("step") == step
        and type(item.get("saved_at")) in (int, float)
        and isinstance(item.get("metrics"), dict)
    )


def _read_index(run_dir: Path) -> dict[str, Any]:
    """The index's entries by folder name (each checked when used); {} when it is missing or
    not one this code wrote."""
    try:
        data = read_json(Path(run_dir) / INDEX_FILE, INDEX_FILE)
    except CheckpointCorrupt:
        return {}
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def refresh_index(run_dir: Path) -> None:
    """Rewrite the run's index to match its checkpoints (only the manifests that changed are
    read). Called by the saving process after each commit and retention pass. It is a cache: a
    failure to write it is logged at debug level and costs recovery only speed, never a save."""
    run_dir = Path(run_dir)
    try:
        entries, _ = ranked_checkpoints(run_dir, use_index=True)
        payload = {
            e.name: {"sig": e.identity, "step": e.step, "saved_at": e.saved_at, "metrics": e.metrics}
            for e in entries
            if e.identity is not None
        }
        raw = json.dumps({"format": INDEX_FORMAT, "entries": payload}, separators=(",", ":"), allow_nan=True)
        tmp = run_dir / (INDEX_FILE + ".tmp")
        tmp.write_text(raw, encoding="utf-8")
        os.replace(tmp, run_dir / INDEX_FILE)
    except (OSError, CheckpointError) as exc:
        log.debug("checkpoint index of %s not refreshed: %s", run_dir, exc)


def latest_valid_checkpoint(
    run_dir: Path, *, full: bool = True, refuse_newer: bool = False
) -> tuple[Path | None, list[dict[str, str]]]:
    """Newest checkpoint that verifies (full hashes, or only the cheap check), and what was
    passed over, each with its reason (refuse_newer: as in ranked_checkpoints)."""
    entries, skipped = ranked_checkpoints(run_dir, refuse_newer=refuse_newer)
    for entry in entries:
        try:
            if full:
                verify_cached(entry.path)
            return entry.path, skipped
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(entry.path), "reason": exc.reason})
    return None, skipped


def latest_verified_checkpoint(run_dir: Path) -> tuple[Path | None, list[dict[str, str]]]:
    """Newest checkpoint whose every hash matches; what the Inference cell falls back to."""
    return latest_valid_checkpoint(run_dir, full=True)


def best_verified_checkpoint(
    run_dir: Path,
    *,
    recorded: str | Path | None = None,
    monitor_metric: str = "val/loss",
    monitor_mode: str = "min",
) -> tuple[Path | None, list[dict[str, str]]]:
    """The best checkpoint that verifies: the recorded best first, then the others by the
    monitored metric, then the newest (a run without the metric). What the Best model cell
    falls back to instead of sending the user round the Recovery loop; every folder passed
    over is in the returned list with its reason."""
    entries, skipped = ranked_checkpoints(run_dir)
    sign = 1.0 if monitor_mode == "min" else -1.0
    by_metric = sorted((e for e in entries if e.metric(monitor_metric) is not None),
                       key=lambda e: sign * (e.metric(monitor_metric) or 0.0))  # fmt: skip
    order: list[Path] = []
    if recorded is not None:
        order.append(Path(recorded))
    order += [e.path for e in by_metric] + [e.path for e in entries]
    seen: set[str] = {s["path"] for s in skipped}
    for path in order:
        if str(path) in seen:
            continue
        seen.add(str(path))
        try:
            verify_cached(path)
            return path, skipped
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(path), "reason": exc.reason})
    return None, skipped


@dataclass
class RetentionResult:
    """What one retention pass did: deleted, kept, left alone because damaged, and failures."""

    deleted: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    damaged: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _verified_first(entries: list[CheckpointEntry], count: int, damaged: list[dict[str, str]]) -> list[Path]:
    kept: list[Path] = []
    for entry in entries:
        if len(kept) >= count:
            break
        try:
            verify_cached(entry.path)
            kept.append(entry.path)
        except CheckpointCorrupt as exc:
            damaged.append({"path": str(entry.path), "reason": exc.reason})
    return kept


def prune_checkpoints(
    run_dir: Path, *, keep_last: int, keep_best: int, monitor_metric: str, monitor_mode: str
) -> RetentionResult:
    """Keep the newest `keep_last` and the best `keep_best` checkpoints *that verify* (full
    hashes; a folder unchanged since this process wrote or hashed it is not re-read);
    delete the other intact ones. `keep_last=0` keeps everything. Damaged folders are left
    for a person, never counted as kept. Failures to delete are returned, not hidden."""
    result = RetentionResult()
    if keep_last == 0:
        return result
    entries, skipped = ranked_checkpoints(run_dir)
    result.damaged += skipped
    keep = _verified_first(entries, max(keep_last, 1), result.damaged)
    sign = 1.0 if monitor_mode == "min" else -1.0
    by_metric = sorted((e for e in entries if e.metric(monitor_metric) is not None),
                       key=lambda e: (sign * (e.metric(monitor_metric) or 0.0), -e.saved_at))  # fmt: skip
    bad = {d["path"] for d in result.damaged}
    keep += _verified_first([e for e in by_metric if str(e.path) not in bad], max(keep_best, 1), result.damaged)
    bad = {d["path"] for d in result.damaged}
    result.kept = sorted(set(keep))
    for entry in entries:
        if entry.path in keep or str(entry.path) in bad:
            continue
        failures = remove_tree(entry.path)
        result.failures += failures
        result.deleted.append(entry.path)
    return result


def apply_retention(
    run_dir: Path, *, keep_last: int, keep_best: int, monitor_metric: str, monitor_mode: str
) -> list[Path]:
    """prune_checkpoints, with each failure to delete and each damaged folder logged as a
    warning naming the path. Returns the deleted folders."""
    result = prune_checkpoints(
        run_dir, keep_last=keep_last, keep_best=keep_best, monitor_metric=monitor_metric, monitor_mode=monitor_mode
    )
    for failure in result.failures:
        log.warning("retention could not delete %s", failure)
    for item in result.damaged:
        log.warning("retention left %s in place: %s (it does not count as a kept checkpoint)", item["path"],
                    item["reason"])  # fmt: skip
    return result.deleted
