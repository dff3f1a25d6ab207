"""Where checkpoints live in a run folder: step folder names and listing (no torch, so recovery stays light)."""

from __future__ import annotations

import re
from pathlib import Path

from .commit import TEMP_PREFIX, TRASH_PREFIX, CheckpointError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


class NoCheckpointFound(CheckpointError):
    """No folder that passes the check exists where we looked."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Committed-looking step folders of a run, newest first (temp and trash folders excluded)."""
    found = []
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return []
    for entry in entries:
        match = STEP_DIR.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def list_leftovers(run_dir: Path) -> list[Path]:
    """Temp folders of saves that never finished, and trash of interrupted deletes."""
    try:
        return sorted(p for p in Path(run_dir).iterdir() if p.name.startswith((TEMP_PREFIX, TRASH_PREFIX)))
    except OSError:
        return []
