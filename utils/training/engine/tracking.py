"""The experiment database as training sees it: best effort, never the reason a run stops.

`TrainingTracker` wraps ExperimentDB for the trainer. A failure to open or write (a locked
or busy file, a full disk, a FUSE mount that refuses locking) is reported once through
`warn` and the tracker goes offline for the rest of the process; training goes on, since
`metrics.jsonl` is the source of truth. The next successful open back-fills the epoch rows
the database is missing, and `close()` tries once more to record the final status.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .experiment_db import ExperimentDB, ExperimentDBError

Warn = Callable[[str], None]
DB_ERRORS = (ExperimentDBError, sqlite3.Error, OSError)
# How long a tracking call waits for another process's write lock: training never waits
# longer than this for its (best-effort) database; the rows are back-filled later.
BUSY_TIMEOUT_S = 5.0
# The "time"/"step"/"epoch" keys are stored in their own columns or not at all.
_NOT_METRICS = ("epoch", "step")


class TrainingTracker:
    """Runs, metrics and status for one training process; every call is best effort."""

    def __init__(self, path: str | Path, *, warn: Warn, busy_timeout_s: float | None = None) -> None:
        self.path = Path(path)
        self.busy_timeout_s = BUSY_TIMEOUT_S if busy_timeout_s is None else busy_timeout_s
        self._warn = warn
        self.warned = False
        self.run_id: int | None = None
        self.db: ExperimentDB | None = None
        self._pending_status: tuple[str, bool] | None = None
        self._attempt("open", self._open)

    @property
    def online(self) -> bool:
        return self.db is not None

    def _open(self) -> None:
        self.db = ExperimentDB(self.path, busy_timeout_s=self.busy_timeout_s)

    def _attempt(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except DB_ERRORS as exc:
            self._go_offline(what, exc)
            return None

    def _go_offline(self, what: str, exc: BaseException) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except DB_ERRORS:
                pass  # already failing; the warning below says what matters
        self.db = None
        if not self.warned:
            self.warned = True
            self._warn(
                f"experiment database {self.path}: {what} failed ({type(exc).__name__}: {exc}); "
                "training continues, metrics.jsonl keeps every epoch and the database is filled in later"
            )

    # -- the run ----------------------------------------------------------------------
    def open_run(
        self,
        run_name: str,
        config: Mapping[str, Any],
        workspace: str,
        *,
        known_ids: list[Any],
    ) -> int | None:
        """The database run of this training run: the first of `known_ids` (from run.json,
        then from the checkpoint) that exists under this name, else a new one. Older runs of
        the same name and workspace still marked `running` died (this process holds the run
        lock): they are marked `failed`, not left running forever."""
        if self.db is None:
            return None

        def work() -> int:
            assert self.db is not None
            for run_id in known_ids:
                if isinstance(run_id, int) and not isinstance(run_id, bool):
                    row = self.db.get_run(run_id)
                    if row is not None and row["name"] == run_name:
                        return run_id
            self.mark_dead_runs(run_name, workspace)
            return self.db.create_run(run_name, dict(config), workspace)

        self.run_id = self._attempt("opening the run", work)
        return self.run_id

    def mark_dead_runs(self, run_name: str, workspace: str) -> list[int]:
        """Runs of this name and workspace still `running` while we hold the run lock died
        (while starting, or killed); they are marked `failed`."""
        assert self.db is not None
        dead = [r["id"] for r in self.db.list_runs()
                if r["name"] == run_name and r["workspace"] == workspace and r["status"] == "running"]  # fmt: skip
        for run_id in dead:
            self.db.set_status(run_id, "failed", finished=True)
        return dead

    def backfill(self, rows: list[dict[str, Any]]) -> int:
        """Write the epoch rows (from metrics.jsonl) that the database lacks. Returns how many."""
        if self.db is None or self.run_id is None:
            return 0

        def work() -> int:
            assert self.db is not None and self.run_id is not None
            have = self.db.metric_steps(self.run_id)
            missing = [r for r in rows if isinstance(r.get("step"), int) and r["step"] not in have]
            for row in missing:
                self.db.log_metrics(self.run_id, row["step"], row.get("epoch"), _metrics_of(row))
            return len(missing)

        return self._attempt("back-filling metrics", work) or 0

    # -- best-effort writes -------------------------------------------------------------
    def log_epoch(self, row: dict[str, Any]) -> None:
        if self.db is not None and self.run_id is not None:
            self._attempt("writing metrics", lambda: self.db.log_metrics(  # type: ignore[union-attr]
                self.run_id, row["step"], row.get("epoch"), _metrics_of(row)))  # fmt: skip

    def mark_resumed(self, branch_step: int, *, abandoned_branch: str | None = None) -> None:
        """Count the resume. Rows past `branch_step` are a crash's replay (deleted: the resume
        writes them again), or, after a rollback (`abandoned_branch` = its abandoned/ folder
        name), moved to the database's abandoned rows, never deleted."""
        if self.db is not None and self.run_id is not None:

            def work() -> None:
                assert self.db is not None and self.run_id is not None
                self.db.mark_resumed(self.run_id)
                if abandoned_branch is not None:
                    self.db.abandon_metrics_after(self.run_id, branch_step, abandoned_branch)
                else:
                    self.db.delete_metrics_after(self.run_id, branch_step)

            self._attempt("marking the resume", work)

    def set_status(self, status: str, *, finished: bool) -> None:
        self._pending_status = (status, finished)
        if self.db is not None and self.run_id is not None:
            if self._attempt("recording the status", lambda: self.db.set_status(self.run_id, status, finished)) is None:  # type: ignore[union-attr]
                return
            self._pending_status = None

    def log_artifact(self, kind: str, path: str, *, step: int) -> None:
        if self.db is not None and self.run_id is not None:
            self._attempt("recording an artifact", lambda: self.db.log_artifact(self.run_id, kind, path, step=step))  # type: ignore[union-attr]

    def close(self, metrics_rows: list[dict[str, Any]] | None = None) -> None:
        """Close; when the database went offline, try once more to back-fill and record the
        final status (a failure is already reported, so it stays silent)."""
        if self.db is None and self.run_id is not None and self._pending_status is not None:
            try:
                self.db = ExperimentDB(self.path, busy_timeout_s=self.busy_timeout_s)
                if metrics_rows:
                    self.backfill(metrics_rows)
                status, finished = self._pending_status
                if self.db is not None:
                    self.db.set_status(self.run_id, status, finished)
            except DB_ERRORS:
                pass  # reported once already; metrics.jsonl holds the rows
        if self.db is not None:
            try:
                self.db.close()
            except DB_ERRORS:
                pass
            self.db = None


def _metrics_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in _NOT_METRICS}
