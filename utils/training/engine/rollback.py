"""Branches of a run: rollback to an older checkpoint, `resume=never`, and refusing to start over.

Before the first step the trainer calls `prepare_resume(run_dir, resume)`. It finishes a
rollback a killed process left half done, then decides where the run continues:

- `auto`: the newest checkpoint that verifies (by `saved_at`); damaged newer ones are set
  aside first, so step names never collide. Checkpoints exist but none verifies: refused.
- a path: exactly that checkpoint of this run (another run's is refused); every newer
  checkpoint and the log lines past its step are set aside (a new branch).
- `never`: refused while any checkpoint verifies; when none does, all of them, the logs and
  `run.json` are set aside, and the run starts fresh (a new database run).

"Set aside" is a move into `<run>/abandoned/<UTC YYYYMMDDTHHMMSSZ>/`; nothing is deleted.
The move is crash-safe: a journal naming every move is written (fsynced) first, each
step is idempotent, and the journal is removed last; the next start finishes it.
Torch-free.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint_index import (
    CheckpointListingError,
    checkpoint_saved_at,
    latest_valid_checkpoint,
    list_checkpoints,
)
from .commit import (
    ABANDONED_DIR,
    CheckpointCorrupt,
    CheckpointError,
    cheap_check,
    fsync_dir,
    read_json,
    utc_stamp,
    verify_cached,
    write_json_file,
)
from .metrics_log import read_log_bytes

JOURNAL_FILE = ".rollback-journal.json"
LOG_FILES = ("metrics.jsonl", "steps.jsonl")
RUN_FILE = "run.json"


class ResumeRefused(CheckpointError):
    """Training must not start: checkpoints exist but none verifies (`damaged` lists them
    with their reasons), or `resume=never` met a checkpoint that verifies. `choices` names
    what the user can do: "new_run_name", "verify", "resume_never", "resume_auto"."""

    def __init__(self, run_dir: Path, reason: str, *, damaged: list[dict[str, str]], choices: list[str]) -> None:
        self.run_dir = Path(run_dir)
        self.damaged = damaged
        self.choices = choices
        words = {
            "new_run_name": "use a new run name",
            "verify": f"check them with verify {run_dir}",
            "resume_never": "set them aside and start over with resume=never",
            "resume_auto": "continue it with resume=auto",
        }
        listed = "; ".join(f"{Path(d['path']).name}: {d['reason']}" for d in damaged[:5])
        more = f" (+{len(damaged) - 5} more)" if len(damaged) > 5 else ""
        super().__init__(
            run_dir, f"{reason}{': ' + listed + more if listed else ''}", "; or ".join(words[c] for c in choices)
        )


class ForeignCheckpoint(CheckpointError):
    """`resume` names a checkpoint that is not a step folder directly inside this run's folder."""


@dataclass
class ResumePlan:
    """Where the run continues (None: fresh) and what was set aside to get there."""

    checkpoint: Path | None
    set_aside: list[dict[str, str]] = field(default_factory=list)  # {path, reason}, as in `skipped`
    batch: Path | None = None  # the abandoned/<time>/ folder used, if any
    finished_journal: bool = False  # a rollback left by a killed process was completed first
    # Decided by plan_resume, done by apply_resume_plan: names to move, the step past which
    # log lines go (None: all), and each name's reason.
    to_move: list[str] = field(default_factory=list)
    branch_step: int | None = None
    reasons: dict[str, str] = field(default_factory=dict)


# -- the journal ------------------------------------------------------------------------
def _new_batch(run_dir: Path) -> Path:
    base = run_dir / ABANDONED_DIR / utc_stamp()
    batch, n = base, 1
    while batch.exists():
        n += 1
        batch = base.with_name(f"{base.name}-{n}")
    return batch


def _write_journal(run_dir: Path, journal: dict[str, Any]) -> None:
    tmp = run_dir / f"{JOURNAL_FILE}.tmp-{os.getpid()}"
    write_json_file(tmp, journal)
    os.replace(tmp, run_dir / JOURNAL_FILE)
    fsync_dir(run_dir)


def _read_lines(path: Path) -> list[bytes]:
    raw = read_log_bytes(path, "log of this package")  # an unreadable log is an error, never "empty"
    return [line for line in raw.splitlines(keepends=True) if line.strip()]


def _line_step(line: bytes) -> int | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _write_atomic(path: Path, lines: list[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.writelines(line if line.endswith(b"\n") else line + b"\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _move_log(run_dir: Path, batch: Path, name: str, branch_step: int | None) -> None:
    """Lines past `branch_step` (all lines when None) into batch/name, then cut from the run's
    log. Idempotent: batch/name is written once (complete or absent), the cut is recomputed."""
    source = run_dir / name
    lines = _read_lines(source)

    def past(line: bytes) -> bool:
        step = _line_step(line)
        return branch_step is None or step is None or step > branch_step

    if not (batch / name).exists():
        cut = [line for line in lines if past(line)]
        if not cut:
            return
        batch.mkdir(parents=True, exist_ok=True)
        _write_atomic(batch / name, cut)
    if source.exists():
        if branch_step is None:
            source.unlink()  # every line is in batch/name already
            fsync_dir(run_dir)
        else:
            _write_atomic(source, [line for line in lines if not past(line)])


def _move_path(run_dir: Path, batch: Path, name: str) -> None:
    source, target = run_dir / name, batch / name
    if not os.path.lexists(source) or os.path.lexists(target):
        return  # moved already (a resumed journal), or gone
    batch.mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    fsync_dir(batch)
    fsync_dir(run_dir)


def _execute(run_dir: Path, journal: dict[str, Any]) -> None:
    batch = run_dir / ABANDONED_DIR / journal["batch"]
    branch_step = journal["branch_step"]
    for name in LOG_FILES:
        _move_log(run_dir, batch, name, branch_step)
    for name in journal["moves"]:
        _move_path(run_dir, batch, name)
    (run_dir / JOURNAL_FILE).unlink()
    fsync_dir(run_dir)


def finish_pending_rollback(run_dir: Path) -> bool:
    """Complete a set-aside a killed process left half done. True when there was one."""
    run_dir = Path(run_dir)
    path = run_dir / JOURNAL_FILE
    if not path.exists():
        return False
    journal = read_json(path, JOURNAL_FILE)
    ok = (
        isinstance(journal, dict)
        and isinstance(journal.get("batch"), str)
        and "/" not in journal["batch"]
        and journal["batch"] not in ("", ".", "..")
        and isinstance(journal.get("moves"), list)
        and all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in journal["moves"])
        and (journal.get("branch_step") is None or isinstance(journal.get("branch_step"), int))
    )
    if not ok:
        raise CheckpointCorrupt(path, "the rollback journal is not one this package wrote", "move it away by hand")
    _execute(run_dir, journal)
    return True


def set_aside_past(run_dir: Path, branch_step: int | None, names: list[str], reason: str) -> Path:
    """Journal, then move `names` (step folders, run.json) and the log lines past
    `branch_step` (all of them when None) into a new abandoned/<UTC>/ batch."""
    batch = _new_batch(run_dir)
    journal = {"batch": batch.name, "branch_step": branch_step, "moves": sorted(names), "reason": reason,
               "created_at": time.time()}  # fmt: skip
    _write_journal(run_dir, journal)
    _execute(run_dir, journal)
    return batch


# -- deciding where the run continues -------------------------------------------------------
def _damaged_all(run_dir: Path) -> list[dict[str, str]]:
    """Every checkpoint with its reason when none verifies; [] when one does."""
    newest, damaged = latest_valid_checkpoint(run_dir)
    return [] if newest is not None else damaged


def _step_and_time(path: Path) -> tuple[int, float]:
    manifest = cheap_check(path)
    return int(manifest.get("step", -1)), checkpoint_saved_at(path, manifest)


def _newer_than(run_dir: Path, checkpoint: Path) -> list[Path]:
    step, saved_at = _step_and_time(checkpoint)
    newer = []
    for folder_step, path in list_checkpoints(run_dir):
        if path == checkpoint:
            continue
        try:
            _, other_time = _step_and_time(path)
        except CheckpointCorrupt:
            other_time = None
        if folder_step > step or (other_time is not None and other_time > saved_at):
            newer.append(path)
    return newer


def branch_from(run_dir: Path, checkpoint: Path, reason: str) -> ResumePlan:
    """Plan to set aside every checkpoint newer than `checkpoint` and the log lines past its step."""
    newer = _newer_than(run_dir, checkpoint)
    step, _ = _step_and_time(checkpoint)
    return ResumePlan(checkpoint, to_move=[p.name for p in newer], branch_step=step,
                      reasons={p.name: reason for p in newer})  # fmt: skip


def _explicit(run_dir: Path, resume: str) -> ResumePlan:
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ForeignCheckpoint(path, "no such checkpoint folder", "pass auto, never or a step-NNNNNN folder")
    if path.resolve().parent != run_dir.resolve():
        raise ForeignCheckpoint(
            path,
            f"is not a checkpoint of this run (its folder is {path.resolve().parent}, the run's is {run_dir})",
            "pass a step folder of this run, or the run name that owns it",
        )
    path = run_dir / path.name
    verify_cached(path)  # the user named it: no silent fallback (CheckpointCorrupt names the file)
    return branch_from(run_dir, path, f"set aside by a rollback to {path.name}")


def _auto(run_dir: Path) -> ResumePlan:
    newest, damaged = latest_valid_checkpoint(run_dir, refuse_newer=True)
    if newest is not None:
        plan = branch_from(run_dir, newest, "set aside by a resume that fell back past it")
        for item in damaged:
            name = Path(item["path"]).name
            if name in plan.reasons:
                plan.reasons[name] = f"{item['reason']}; set aside by a resume that fell back past it"
        return plan
    if damaged:
        raise ResumeRefused(run_dir, f"{run_dir} has checkpoints but none verifies", damaged=damaged,
                            choices=["new_run_name", "verify", "resume_never"])  # fmt: skip
    return ResumePlan(None)


def _never(run_dir: Path) -> ResumePlan:
    existing = list_checkpoints(run_dir)
    if not existing:
        return ResumePlan(None)
    damaged = _damaged_all(run_dir)
    if not damaged:
        raise ResumeRefused(run_dir, f"{run_dir} has a checkpoint that verifies and resume=never was given",
                            damaged=[], choices=["resume_auto", "new_run_name"])  # fmt: skip
    reasons = {Path(d["path"]).name: f"{d['reason']}; set aside by resume=never" for d in damaged}
    names = [p.name for _, p in existing] + ([RUN_FILE] if (run_dir / RUN_FILE).exists() else [])
    return ResumePlan(None, to_move=names, branch_step=None, reasons=reasons)


def plan_resume(run_dir: Path, resume: str) -> ResumePlan:
    """Finish a pending rollback, then decide where `resume` (auto | never | a checkpoint
    path) continues and what must be set aside; moves nothing else. Raises ResumeRefused,
    ForeignCheckpoint, CheckpointListingError, UnsupportedFormat (auto: the newest checkpoint
    was written by a newer version), or CheckpointCorrupt (a named checkpoint that does not
    verify)."""
    run_dir = Path(run_dir)
    finished = finish_pending_rollback(run_dir) if run_dir.is_dir() else False
    if resume == "never":
        plan = _never(run_dir)
    elif resume == "auto":
        plan = _auto(run_dir)
    else:
        plan = _explicit(run_dir, resume)
    plan.finished_journal = finished
    return plan


def apply_resume_plan(run_dir: Path, plan: ResumePlan) -> ResumePlan:
    """Set aside what the plan names (crash-safe, through the journal); fills `set_aside`
    (for `skipped`) and `batch`. Call it after every check that could still refuse the
    resume, before the first step."""
    run_dir = Path(run_dir)
    if not plan.to_move:
        return plan  # lines past the newest checkpoint are replayed by the resume, not set aside
    reason = next(iter(plan.reasons.values()), "set aside")
    plan.batch = set_aside_past(run_dir, plan.branch_step, plan.to_move, reason)
    plan.set_aside = [{"path": str(plan.batch / n), "reason": plan.reasons.get(n, reason)}
                      for n in sorted(plan.to_move) if n != RUN_FILE]  # fmt: skip
    plan.to_move = []
    return plan


def prepare_resume(run_dir: Path, resume: str) -> ResumePlan:
    """plan_resume, then apply_resume_plan: on a refusal nothing on disk has changed."""
    return apply_resume_plan(run_dir, plan_resume(run_dir, resume))


def abandoned_batches(run_dir: Path) -> list[dict[str, str]]:
    """What earlier rollbacks set aside, as `skipped` entries (one per batch folder)."""
    root = Path(run_dir) / ABANDONED_DIR
    try:
        batches = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CheckpointListingError(root, f"cannot list: {exc.strerror or exc}") from exc
    items = []
    for batch in batches:
        try:
            names = sorted(p.name for p in batch.iterdir())
        except OSError:
            names = []
        items.append({"path": str(batch), "reason": f"set aside by a rollback or resume ({', '.join(names)})"})
    return items
