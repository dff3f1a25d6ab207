"""Which run: every run folder in a list of search locations, ranked by its newest checkpoint's `saved_at`.

The notebook's Recovery cell, its run picker and the CLI's `recover` without a folder all use one
rule (DESIGN.md, "Which run"): newest across every location, not newest inside the first location
that has runs. A run's recency is the `saved_at` recorded inside its newest checkpoint that passes the
cheap check (manifest and sizes), never a file's mtime; ties go by path. Runs with no complete
checkpoint are listed last, so a caller can say what it found and why it cannot use it. Metadata only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint_index import NoCheckpointFound, list_checkpoints
from .commit import CheckpointCorrupt, cheap_check
from .recovery import build_results, resolve_runs
from .trainer_state import read_trainer_state


@dataclass(frozen=True)
class RunOnDisk:
    """One run folder found in a search location, and its newest complete checkpoint (if any)."""

    run_dir: Path
    location: str  # the search location it was found in, as given
    checkpoint: Path | None  # its newest checkpoint that passes the cheap check; None when none does
    saved_at: float | None  # `saved_at` recorded inside that checkpoint
    step: int | None
    skipped: tuple[dict[str, str], ...] = field(default=())  # newer checkpoints passed over, with the reason

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def complete(self) -> bool:
        return self.checkpoint is not None


def inspect_run(run_dir: Path, location: str = "") -> RunOnDisk:
    """The run folder's newest checkpoint that passes the cheap check, read from metadata only."""
    skipped: list[dict[str, str]] = []
    for step, path in list_checkpoints(run_dir):
        try:
            state = read_trainer_state(path, cheap_check(path))
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(path), "reason": exc.reason})
            continue
        saved_at = state.get("saved_at")
        if not isinstance(saved_at, (int, float)):  # an older format without it: the manifest's write time
            saved_at = path.stat().st_mtime
        return RunOnDisk(run_dir, location, path, float(saved_at), int(state.get("step", step)), tuple(skipped))
    return RunOnDisk(run_dir, location, None, None, None, tuple(skipped))


def newest_first(runs: Iterable[RunOnDisk]) -> list[RunOnDisk]:
    """Complete runs newest first (ties by path), then the runs with nothing complete, by path."""
    runs = list(runs)
    complete = sorted((r for r in runs if r.complete), key=lambda r: (-(r.saved_at or 0.0), str(r.run_dir)))
    return complete + sorted((r for r in runs if not r.complete), key=lambda r: str(r.run_dir))


def find_runs(locations: Iterable[str | os.PathLike], run_name: str | None = None) -> list[RunOnDisk]:
    """Every run folder in these locations (a workspace, a checkpoints/ folder or a run folder each),
    each listed once (under the first location it was found in), newest first."""
    seen: dict[Path, RunOnDisk] = {}
    for location in locations:
        base = Path(location).expanduser()
        if not base.is_dir():
            continue
        for run_dir in resolve_runs(base)[0]:
            key = run_dir.resolve()
            if key not in seen and (run_name is None or run_dir.name == run_name):
                seen[key] = inspect_run(run_dir, str(location))
    return newest_first(seen.values())


def recover_run(run: RunOnDisk, searched: list[str] | None = None) -> dict[str, Any]:
    """The results dict of exactly this run, from its newest complete checkpoint; NoCheckpointFound
    when it has none (never another run)."""
    if run.checkpoint is None:
        raise NoCheckpointFound(
            run.run_dir, "this run folder has no complete checkpoint", "train it, or choose another run"
        )
    results = build_results(run.run_dir, checkpoint=run.checkpoint, recovered=True, skipped=list(run.skipped))
    results["searched"] = list(searched if searched is not None else [run.location or str(run.run_dir)])
    return results


def recover_newest(locations: Iterable[str | os.PathLike], run_name: str | None = None) -> dict[str, Any]:
    """The newest run (or the newest named `run_name`) across every location. Raises NoCheckpointFound
    naming each place looked and each run folder passed over."""
    locations = [str(location) for location in locations]
    runs = find_runs(locations, run_name)
    if runs and runs[0].complete:
        return recover_run(runs[0], searched=locations)
    passed = [f"{r.run_dir}: no complete checkpoint" for r in runs]
    detail = f"; passed over: {'; '.join(passed[:5])}" if passed else ""
    raise NoCheckpointFound(
        ", ".join(locations) or "(no folders given)",
        f"no complete checkpoint found{f' for run {run_name!r}' if run_name else ''}{detail}",
        "train first, or pass the folder that holds the run (a workspace, checkpoints/, a run or a step folder)",
    )
