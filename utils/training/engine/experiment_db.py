"""Experiment tracker on SQLite: runs, metrics and artifacts, safe across processes.

One file, stdlib `sqlite3`, WAL journal. Every write is a short `BEGIN IMMEDIATE`
transaction retried while another process holds the write lock, so two trainers (or a
trainer and a dashboard) writing the same file at once lose nothing.

SQLite cannot store NaN: it turns a NaN into NULL. The `metrics.value` column is only
ever written from numbers, so a NULL there means NaN, and `metrics_frame` reads it back
as NaN. Infinities are stored as they are.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .experiment_store import (  # noqa: F401 - SCHEMA_VERSION and the errors are part of this module's API
    LOCK_RETRY_SECONDS,
    RUN_STATUSES,
    SCHEMA_VERSION,
    ExperimentDBError,
    RunNotFound,
    SQLiteStore,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# Metric names that would collide with the index columns of `metrics_frame`; the step
# and the epoch are stored in their own columns, so such values are dropped on write.
_RESERVED_METRIC_NAMES = frozenset({"step", "epoch"})
# Stands in for a NULL epoch while pivoting (pandas drops NaN keys); never a real epoch.
_NO_EPOCH = -(2**62)


def _metric_value(value: object) -> float | None:
    """The value as a float, or None when it is not a real number (it is then skipped)."""
    if type(value) is float:
        return value
    if isinstance(value, numbers.Real):  # int, bool, numpy scalars, Fraction
        return float(value)
    return None


class ExperimentDB(SQLiteStore):
    """Runs, their metrics and their artifacts in one SQLite file.

    One connection per instance, shared by threads under a lock. Open one instance per
    process; several processes may open the same file at once.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = LOCK_RETRY_SECONDS) -> None:
        """`busy_timeout_s`: how long a call waits for another process's write lock before it
        fails (training uses a short one: its tracking is best effort)."""
        self._skipped_metric_names: set[str] = set()
        super().__init__(path, busy_timeout_s=busy_timeout_s)

    def __enter__(self) -> ExperimentDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _touch_run(self, conn: sqlite3.Connection, run_id: int, now: float) -> None:
        cursor = conn.execute("UPDATE runs SET updated_at=? WHERE id=?", (now, int(run_id)))
        if cursor.rowcount == 0:
            raise self._no_run(run_id)

    def _no_run(self, run_id: int) -> RunNotFound:
        return RunNotFound(
            f"{self.path}: no run with id {run_id}; create it with create_run() first "
            "(list_runs() shows the runs this database holds)."
        )

    @staticmethod
    def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
        run = dict(row)
        run["config"] = json.loads(run.pop("config_json"))
        return run

    # ------------------------------------------------------------------ runs

    def create_run(
        self,
        name: str,
        config: Mapping[str, Any],
        workspace: str | os.PathLike[str],
        status: str = "running",
        recovered_from: int | None = None,
    ) -> int:
        """Insert a run and return its id. Non-JSON config values are stored as str."""
        self._check_status(status)
        config_json = json.dumps(dict(config), sort_keys=True, default=str)

        def work(conn: sqlite3.Connection) -> int:
            if recovered_from is not None:
                found = conn.execute("SELECT 1 FROM runs WHERE id=?", (int(recovered_from),)).fetchone()
                if found is None:
                    raise self._no_run(recovered_from)
            now = time.time()
            cursor = conn.execute(
                "INSERT INTO runs (name, status, config_json, workspace, created_at,"
                " recovered_from, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    str(name),
                    status,
                    config_json,
                    os.fspath(workspace),
                    now,
                    recovered_from,
                    now,
                ),
            )
            return int(cursor.lastrowid)

        return self._write(work)

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        """The run as a dict (`config` decoded), or None when there is no such run."""
        rows = self._read("SELECT * FROM runs WHERE id=?", (int(run_id),))
        return self._run_dict(rows[0]) if rows else None

    def find_run(self, name: str) -> dict[str, Any] | None:
        """The newest run with this name, or None."""
        rows = self._read("SELECT * FROM runs WHERE name=? ORDER BY id DESC LIMIT 1", (str(name),))
        return self._run_dict(rows[0]) if rows else None

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        return [self._run_dict(row) for row in self._read("SELECT * FROM runs ORDER BY id")]

    def _check_status(self, status: str) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"{self.path}: unknown run status {status!r}; use one of {sorted(RUN_STATUSES)}.")

    def set_status(self, run_id: int, status: str, finished: bool = False) -> None:
        """Set the status. `finished=True` stamps finished_at; "running" clears it."""
        self._check_status(status)

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            if finished:
                finished_sql, params = "?", (now,)
            elif status == "running":
                finished_sql, params = "NULL", ()
            else:
                finished_sql, params = "finished_at", ()
            cursor = conn.execute(
                f"UPDATE runs SET status=?, finished_at={finished_sql}, updated_at=? WHERE id=?",
                (status, *params, now, int(run_id)),
            )
            if cursor.rowcount == 0:
                raise self._no_run(run_id)

        self._write(work)

    def mark_resumed(self, run_id: int) -> int:
        """Count one more resume, set the run running again; return the new count."""

        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE runs SET resume_count=resume_count+1, status='running',"
                " finished_at=NULL, updated_at=? WHERE id=?",
                (time.time(), int(run_id)),
            )
            if cursor.rowcount == 0:
                raise self._no_run(run_id)
            row = conn.execute("SELECT resume_count FROM runs WHERE id=?", (int(run_id),)).fetchone()
            return int(row[0])

        return self._write(work)

    # ------------------------------------------------------------------ metrics

    def _metric_rows(
        self,
        run_id: int,
        rows: Iterable[tuple[int, int | None, str, object]],
        now: float,
    ) -> Iterator[tuple[int, int, int | None, str, float, float]]:
        for step, epoch, name, value in rows:
            number = _metric_value(value)
            if number is None or name in _RESERVED_METRIC_NAMES:
                self._note_skipped(str(name), value)
                continue
            epoch_value = None if epoch is None else int(epoch)
            yield (run_id, int(step), epoch_value, str(name), number, now)

    def _note_skipped(self, name: str, value: object) -> None:
        if name not in self._skipped_metric_names:
            self._skipped_metric_names.add(name)
            logger.warning(
                "%s: not logging metric %r (value of type %s): only real numbers are "
                "stored, and 'step'/'epoch' are columns of their own.",
                self.path,
                name,
                type(value).__name__,
            )

    def log_metrics(
        self,
        run_id: int,
        step: int,
        epoch: int | None,
        values: Mapping[str, object],
    ) -> None:
        """Store one row per metric name at this step. Non-numbers are skipped."""
        self.log_metrics_many(run_id, ((step, epoch, name, value) for name, value in values.items()))

    def log_metrics_many(self, run_id: int, rows: Iterable[tuple[int, int | None, str, object]]) -> None:
        """Store many (step, epoch, name, value) rows in one transaction."""
        run_id = int(run_id)
        rows = list(rows)  # a retried transaction must see the same rows again

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            self._touch_run(conn, run_id, now)
            conn.executemany(
                "INSERT INTO metrics (run_id, step, epoch, name, value, time) VALUES (?, ?, ?, ?, ?, ?)",
                self._metric_rows(run_id, rows, now),
            )

        self._write(work)

    def delete_metrics_after(self, run_id: int, step: int) -> int:
        """Delete the run's metric rows with step > `step`; return how many went."""

        def work(conn: sqlite3.Connection) -> int:
            self._touch_run(conn, run_id, time.time())
            cursor = conn.execute(
                "DELETE FROM metrics WHERE run_id=? AND step>?",
                (int(run_id), int(step)),
            )
            return int(cursor.rowcount)

        return self._write(work)

    def abandon_metrics_after(self, run_id: int, step: int, branch: str) -> int:
        """Move the run's metric rows with step > `step` into `abandoned_metrics` (a rollback
        to `step`; `branch` names its abandoned/<time>/ folder): kept, never deleted, and no
        longer part of the run's history. Returns how many moved."""

        def work(conn: sqlite3.Connection) -> int:
            now = time.time()
            self._touch_run(conn, run_id, now)
            conn.execute(
                "INSERT INTO abandoned_metrics (run_id, step, epoch, name, value, time, branch, abandoned_at)"
                " SELECT run_id, step, epoch, name, value, time, ?, ? FROM metrics WHERE run_id=? AND step>?",
                (str(branch), now, int(run_id), int(step)),
            )
            cursor = conn.execute("DELETE FROM metrics WHERE run_id=? AND step>?", (int(run_id), int(step)))
            return int(cursor.rowcount)

        return self._write(work)

    def metric_steps(self, run_id: int) -> set[int]:
        """The steps at which this run has any metric (what a back-fill compares against)."""
        return {
            int(r[0]) for r in self._read_tuples("SELECT DISTINCT step FROM metrics WHERE run_id=?", (int(run_id),))
        }

    def metrics_frame(self, run_id: int) -> pd.DataFrame:
        """One row per (step, epoch), one float column per metric name, by step.

        A name logged twice at the same (step, epoch) keeps the latest value. The epoch
        column is int64, or nullable Int64 when some rows were logged without one.
        """
        import pandas as pd

        # Index order; rowid last so that of duplicate rows the newest comes last.
        rows = self._read_tuples(
            "SELECT step, epoch, name, value FROM metrics WHERE run_id=? ORDER BY name, step, rowid",
            (int(run_id),),
        )
        if not rows:
            return pd.DataFrame(columns=["step", "epoch"])
        long = pd.DataFrame(rows, columns=["step", "epoch", "name", "value"])
        long["value"] = long["value"].astype("float64")  # NULL is SQLite's NaN
        has_missing_epoch = bool(long["epoch"].isna().any())
        if has_missing_epoch:
            long["epoch"] = long["epoch"].fillna(_NO_EPOCH)
        long["epoch"] = long["epoch"].astype("int64")
        long = long.drop_duplicates(["step", "epoch", "name"], keep="last")
        wide = long.pivot(index=["step", "epoch"], columns="name", values="value")
        wide.columns.name = None
        wide = wide.reset_index()  # pivot sorts the index, so rows are by step
        if has_missing_epoch:
            epoch = wide["epoch"].astype("Int64")
            wide["epoch"] = epoch.mask(epoch == _NO_EPOCH)
        return wide

    # ------------------------------------------------------------------ artifacts

    def log_artifact(
        self,
        run_id: int,
        kind: str,
        path: str | os.PathLike[str],
        step: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a file the run produced (checkpoint, CSV, plot); return its id."""
        meta_json = None if meta is None else json.dumps(dict(meta), default=str)

        def work(conn: sqlite3.Connection) -> int:
            now = time.time()
            self._touch_run(conn, run_id, now)
            cursor = conn.execute(
                "INSERT INTO artifacts (run_id, kind, path, step, created_at, meta_json) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    int(run_id),
                    str(kind),
                    os.fspath(path),
                    None if step is None else int(step),
                    now,
                    meta_json,
                ),
            )
            return int(cursor.lastrowid)

        return self._write(work)

    def artifacts(self, run_id: int) -> list[dict[str, Any]]:
        """The run's artifacts, oldest first, with `meta` decoded (None when absent)."""
        rows = self._read("SELECT * FROM artifacts WHERE run_id=? ORDER BY id", (int(run_id),))
        result = []
        for row in rows:
            artifact = dict(row)
            meta_json = artifact.pop("meta_json")
            artifact["meta"] = None if meta_json is None else json.loads(meta_json)
            result.append(artifact)
        return result
