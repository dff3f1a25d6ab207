"""Recovery: find the newest run on disk and rebuild the results dict from metadata alone.

It reads JSON and `stat`, never weights, and imports no torch: the newest checkpoint (by the
`saved_at` recorded inside it, ties by path) that passes the cheap check (manifest present
and valid, every file present with its size, folder name and manifest step agreeing) is
taken, and everything passed over is listed in `skipped` with the reason: damaged folders,
a recorded best checkpoint that is gone, and what rollbacks set aside in `abandoned/`.
Checkpoints are ranked through the run's index (checkpoint_index.py), so only the manifests
that changed since the last save, and the one taken, are read.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

from .checkpoint_index import (
    CheckpointListingError,
    NoCheckpointFound,
    list_checkpoints,
    list_leftovers,
    ranked_checkpoints,
)
from .commit import MANIFEST_NAME, CheckpointCorrupt, cheap_check, read_json, subfolders
from .foreign_runs import SOURCE_OURS, NoForeignCheckpoint, detect, read_foreign_run
from .metrics_log import METRICS_FILE, STEPS_FILE, drift_history, read_metrics_log, read_steps_log, thin_rows
from .rollback import abandoned_batches
from .trainer_state import TRAINER_FILE, read_trainer_state

RUN_FILE = "run.json"
DEFAULT_TASK_PATH = "utils.training.engine.lm_task:build_task"  # runs from before the Task API (no torch import here)
DEFAULT_SEARCH_DIRS = (
    "/content/workspace/checkpoints",
    "./training_output/checkpoints",
    "./tmp_training_output/checkpoints",
)


def _is_run_dir(path: Path) -> bool:
    try:
        return (path / RUN_FILE).is_file() or bool(list_checkpoints(path))
    except CheckpointListingError:
        return True  # a run folder we cannot list is reported as such, not taken for "no run"


def _runs_in(checkpoints_dir: Path) -> list[Path]:
    return [p for p in subfolders(checkpoints_dir) if _is_run_dir(p)]


def resolve_runs(path: Path) -> tuple[list[Path], Path | None]:
    """What a user pointed at -> (run folders found, the one checkpoint named, if any).
    Accepts a workspace, a checkpoints/ folder, a run folder or one checkpoint folder."""
    if (path / MANIFEST_NAME).exists() or (path / TRAINER_FILE).exists():
        return [path.parent], path
    if _is_run_dir(path):
        return [path], None
    if (path / "checkpoints").is_dir():
        return _runs_in(path / "checkpoints"), None
    return _runs_in(path), None


def _ranked_runs(runs: list[Path]) -> list[tuple[Path, Any]]:
    """Each run with its ranked checkpoints (or the listing error), most recently saved run first:
    by the mtime of its newest checkpoint (the folder's when it has none), as the notebook's run
    picker orders runs. Each run folder is ranked once."""
    ranked: list[tuple[tuple[float, str], Path, Any]] = []
    for run_dir in runs:
        try:
            outcome: Any = ranked_checkpoints(run_dir, use_index=True)  # its newest checkpoint by saved_at
        except CheckpointListingError as exc:
            ranked.append(((0.0, str(run_dir)), run_dir, exc))
            continue
        if len(runs) == 1:
            return [(run_dir, outcome)]  # nothing to order
        try:
            recency = ((outcome[0][0].path if outcome[0] else run_dir).stat().st_mtime, str(run_dir))
        except OSError:
            recency = (0.0, str(run_dir))
        ranked.append((recency, run_dir, outcome))
    ranked.sort(key=lambda item: item[0], reverse=True)
    return [(run_dir, outcome) for _, run_dir, outcome in ranked]


def _best_checkpoint(
    run_dir: Path, trainer_state: dict[str, Any], fallback: Path, skipped: list[dict[str, str]]
) -> Path:
    """The recorded best checkpoint, or (said in `skipped`, with the reason) the newest valid one."""
    best = trainer_state.get("best") or {}
    name = best.get("checkpoint")
    if name == fallback.name and fallback.parent == run_dir:
        return fallback  # the checkpoint being recovered: checked already
    if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
        try:
            cheap_check(run_dir / name)
            return run_dir / name
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(run_dir / name),
                            "reason": f"recorded best checkpoint: {exc.reason}; the newest valid one stands in"})  # fmt: skip
    return fallback


def best_epoch(metrics_history: list[dict[str, Any]], metric: str = "val/loss", mode: str = "min") -> int | None:
    scored = [r for r in metrics_history if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return metrics_history[-1]["epoch"] if metrics_history else None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r[metric])["epoch"]


def build_results(
    run_dir: Path,
    *,
    checkpoint: Path | None = None,
    recovered: bool,
    skipped: list[dict[str, str]] | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results dict (see DESIGN.md) for one run folder, from metadata only. `manifest` is
    `checkpoint`'s, when the caller has just cheap-checked it."""
    run_dir = Path(run_dir)
    skipped = list(skipped or [])
    state: dict[str, Any] | None = None
    if checkpoint is None:
        entries, passed_over = ranked_checkpoints(run_dir, use_index=True)
        skipped += passed_over
        for entry in entries:
            try:
                state = read_trainer_state(entry.path, entry.manifest or cheap_check(entry.path))
                checkpoint = entry.path
                break
            except CheckpointCorrupt as exc:
                skipped.append({"path": str(entry.path), "reason": exc.reason})
    if checkpoint is None:
        raise NoCheckpointFound(
            run_dir, "no complete checkpoint in this run folder", "train first, or point at another run"
        )
    skipped += [
        {"path": str(p), "reason": "unfinished save or delete (temporary folder), ignored"}
        for p in list_leftovers(run_dir)
    ]
    try:
        skipped += abandoned_batches(run_dir)
    except CheckpointListingError as exc:
        skipped.append({"path": exc.path, "reason": exc.reason})
    if state is None:  # the trainer state is small: its bytes are checked against the manifest's hash
        state = read_trainer_state(checkpoint, manifest or cheap_check(checkpoint))
    run_info: Any = {}
    try:
        run_info = read_json(run_dir / RUN_FILE, RUN_FILE)
    except CheckpointCorrupt:
        pass  # run.json is informative; the checkpoint's own state has everything needed
    if not isinstance(run_info, dict):
        run_info = {}
    config = state.get("config") or run_info.get("config") or {}
    if not isinstance(config, dict):
        config = {}
    epochs_done = int(state.get("epoch", 0))
    # The checkpoint's own history is authoritative (it matches the weights); metrics.jsonl
    # fills in only for a checkpoint that carries none.
    history = state.get("metrics_history")
    rows = (
        [r for r in history if isinstance(r, dict) and isinstance(r.get("epoch"), int)]
        if isinstance(history, list)
        else []
    )
    if not rows:
        try:
            rows = read_metrics_log(run_dir / METRICS_FILE)
        except CheckpointCorrupt as exc:
            skipped.append({"path": exc.path, "reason": exc.reason})
    by_epoch = {r["epoch"]: r for r in rows if 1 <= r["epoch"] <= epochs_done}
    metrics_history = [by_epoch[e] for e in sorted(by_epoch)]
    workspace = run_dir.parent.parent
    step = int(state.get("step", 0))
    try:  # step-level rows up to the recovered checkpoint (lines past it belong to a crashed process)
        step_history = thin_rows(read_steps_log(run_dir / STEPS_FILE, up_to_step=step))
    except CheckpointCorrupt as exc:
        step_history = []
        skipped.append({"path": exc.path, "reason": exc.reason})
    monitor = config.get("monitor_metric", "val/loss")
    monitor_mode = config.get("monitor_mode", "min")
    return {
        "source": SOURCE_OURS,
        "run_name": state.get("run_name", run_dir.name),
        "run_id": state.get("run_id", run_info.get("run_id")),
        "workspace_root": str(workspace),
        "checkpoint_dir": str(run_dir.parent),
        "run_dir": str(run_dir),
        "checkpoint_path": str(checkpoint),
        "best_checkpoint_path": str(_best_checkpoint(run_dir, state, checkpoint, skipped)),
        "config": config,
        "metrics_history": metrics_history,
        "best_epoch": best_epoch(metrics_history, monitor, monitor_mode),
        "best": state.get("best"),
        "monitor_metric": monitor,
        "drift_history": drift_history(metrics_history),
        "recovered": recovered,
        "skipped": skipped,
        "step": int(state.get("step", 0)),
        "epoch": epochs_done,
        "total_steps": state.get("total_steps"),
        "completed": bool(state.get("completed", False)),
        "resume_count": int(state.get("resume_count", 0)),
        "step_history": step_history,
        "task": state.get("task") or run_info.get("task") or DEFAULT_TASK_PATH,
    }


def _foreign_results(base: Path, run_name: str | None, skipped: list[dict[str, str]]) -> dict[str, Any] | None:
    """The results of a Hugging Face output_dir or Lightning log folder at `base`, or None
    (not one, another run name, or nothing readable there: listed in `skipped`)."""
    found = detect(base)
    if found is None:
        return None
    try:
        results = read_foreign_run(*found, recovered=True)
    except (NoForeignCheckpoint, CheckpointCorrupt) as exc:
        skipped.append({"path": str(exc.path), "reason": exc.reason})
        return None
    if run_name is not None and results["run_name"] != run_name:
        return None
    results["skipped"] = skipped + results["skipped"]
    return results


def recover(
    checkpoint_directory: str | os.PathLike | None = None,
    search_dirs: list[str | os.PathLike] | None = None,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Search the given folder first, then the defaults; take the newest run (or `run_name`)
    and its newest valid checkpoint. Raises NoCheckpointFound naming every place looked."""
    candidates = [Path(checkpoint_directory).expanduser()] if checkpoint_directory else []
    candidates += [Path(d).expanduser() for d in (DEFAULT_SEARCH_DIRS if search_dirs is None else search_dirs)]
    searched: list[str] = []
    skipped: list[dict[str, str]] = []
    for base in candidates:
        searched.append(str(base))
        if not base.is_dir():
            continue
        if (foreign := _foreign_results(base, run_name, skipped)) is not None:
            foreign["searched"] = searched
            return foreign
        runs, named_checkpoint = resolve_runs(base)
        if run_name is not None:
            runs = [r for r in runs if r.name == run_name]
        for run_dir, outcome in _ranked_runs(runs):
            # The named step folder first (if any), then the run's checkpoints newest first;
            # each one passed over is listed, also when the run yields nothing.
            tried = [named_checkpoint] if named_checkpoint is not None else []
            if isinstance(outcome, CheckpointListingError):
                skipped.append({"path": outcome.path, "reason": outcome.reason})
                continue
            entries, passed_over = outcome
            skipped += [s for s in passed_over if Path(s["path"]) != named_checkpoint]
            newest_first = (e.path for e in entries if e.path != named_checkpoint)  # lazily: usually one is tried
            for checkpoint in itertools.chain(tried, newest_first):
                try:
                    manifest = cheap_check(checkpoint)
                    results = build_results(run_dir, checkpoint=checkpoint, recovered=True, skipped=skipped,
                                            manifest=manifest)  # fmt: skip
                except CheckpointCorrupt as exc:
                    skipped.append({"path": str(checkpoint), "reason": exc.reason})
                    continue
                results["searched"] = searched
                return results
            skipped.append({"path": str(run_dir), "reason": "run folder has no complete checkpoint"})
    where = ", ".join(searched) if searched else "(no folders given)"
    detail = f"; passed over: {'; '.join(s['path'] + ': ' + s['reason'] for s in skipped[:5])}" if skipped else ""
    raise NoCheckpointFound(
        where,
        f"no complete checkpoint found{f' for run {run_name!r}' if run_name else ''}{detail}",
        "train first, or pass the folder that holds the run (a workspace, checkpoints/, a run or a step folder)",
    )
