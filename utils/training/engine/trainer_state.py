"""trainer_state.json: what a checkpoint's trainer state must hold, checked on every read.

Recovery and resume both read this file; a damaged or foreign one must end in
CheckpointCorrupt (or UnsupportedFormat for a newer version), never in a TypeError deep
inside the caller. Missing optional fields are fine (older writers); present ones must have
the type this package writes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .commit import CheckpointCorrupt, UnsupportedFormat, bytes_digest, parse_json, read_small_file

TRAINER_FILE = "trainer_state.json"
TRAINER_STATE_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_trainer_state(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Return `state` if it has the shape this package writes; raise CheckpointCorrupt naming
    the field otherwise, and UnsupportedFormat for a state written by a newer version."""

    def bad(field: str, expected: str) -> CheckpointCorrupt:
        return CheckpointCorrupt(path, f"trainer state field {field!r} is not {expected}", "use an older checkpoint")

    if not isinstance(state, dict):
        raise CheckpointCorrupt(path, "trainer state is not a JSON object", "use an older checkpoint")
    version = state.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise bad("format_version", "an integer >= 1")
    if version > TRAINER_STATE_VERSION:
        raise UnsupportedFormat(
            path,
            f"trainer state written by format version {version}; this package reads up to {TRAINER_STATE_VERSION}",
            "upgrade the package to use this checkpoint",
        )
    for field in ("step", "epoch", "resume_count", "step_in_epoch"):
        if field in state and not (_is_int(state[field]) and state[field] >= 0):
            raise bad(field, "an integer >= 0")
    for field in ("total_steps", "run_id", "world_size"):
        if state.get(field) is not None and not _is_int(state[field]):
            raise bad(field, "an integer or null")
    for field in ("wall_seconds", "saved_at"):
        if field in state and not _is_number(state[field]):
            raise bad(field, "a number")
    for field in ("run_name", "reason"):
        if field in state and not isinstance(state[field], str):
            raise bad(field, "a string")
    if "completed" in state and not isinstance(state["completed"], bool):
        raise bad("completed", "true or false")
    if "config" in state and not isinstance(state["config"], dict):
        raise bad("config", "an object")
    if not isinstance(state.get("config", {}).get("monitor_metric", ""), str):
        raise bad("config.monitor_metric", "a string")
    history = state.get("metrics_history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) and _is_int(r.get("epoch")) for r in history):
        raise bad("metrics_history", "a list of objects with an integer epoch")
    best = state.get("best")
    if best is not None:
        if not isinstance(best, dict):
            raise bad("best", "an object or null")
        if "checkpoint" in best and not isinstance(best["checkpoint"], str):
            raise bad("best.checkpoint", "a string")
        if "value" in best and not (_is_number(best["value"]) and not math.isnan(best["value"])):
            raise bad("best.value", "a number")
    return state


def read_trainer_state(folder: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and check `<folder>/trainer_state.json`. With the folder's manifest, its bytes are
    also checked against the recorded size and hash (it is small, so this stays cheap)."""
    path = Path(folder) / TRAINER_FILE
    raw = read_small_file(path, TRAINER_FILE)
    entry = (manifest or {}).get("files", {}).get(TRAINER_FILE)
    if isinstance(entry, dict) and (len(raw) != entry.get("size_bytes") or bytes_digest(raw) != entry.get("hash")):
        raise CheckpointCorrupt(
            path, f"{TRAINER_FILE} does not match its hash in the manifest (corrupted bytes)", "use an older one"
        )
    state = parse_json(path, TRAINER_FILE, raw)
    return check_trainer_state(state, path)
