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
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RUN_STATUSES = frozenset({"running", "completed", "interrupted", "failed", "recovered"})
LOCK_RETRY_SECONDS = 30.0

# Metric names that would collide with the index columns of `metrics_frame`; the step
# and the epoch are stored in their own columns, so such values are dropped on write.
_RESERVED_METRIC_NAMES = frozenset({"step", "epoch"})
# Stands in for a NULL epoch while pivoting (pandas drops NaN keys); never a real epoch.
_NO_EPOCH = -(2**62)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    config_json TEXT NOT NULL,
    workspace TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL NULL,
    recovered_from INTEGER NULL REFERENCES runs(id),
    resume_count INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs (name, id);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    epoch INTEGER NULL,
    name TEXT NOT NULL,
    value REAL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_run_name_step ON metrics (run_id, name, step);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    step INTEGER NULL,
    created_at REAL NOT NULL,
    meta_json TEXT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_run ON artifacts (run_id, id);
CREATE TABLE IF NOT EXISTS abandoned_metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    epoch INTEGER NULL,
    name TEXT NOT NULL,
    value REAL,
    time REAL NOT NULL,
    branch TEXT NOT NULL,
    abandoned_at REAL NOT NULL
);
"""

_T = TypeVar("_T")
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # result codes; sqlite3 names them from 3.11


class ExperimentDBError(Exception):
    """The experiment database cannot be used; the message names the path and the fix."""


class RunNotFound(ExperimentDBError, LookupError):
    """A write named a run id that is not in the database."""


def _is_lock_error(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _retry_while_locked(action: Callable[[], _T], limit_s: float = LOCK_RETRY_SECONDS) -> _T:
    """Run `action`, retrying with a small random backoff while the file is locked.

    SQLite's own busy handler already waits up to 30 s inside most calls; this covers
    the cases where it returns "locked" at once (e.g. two processes racing to set up a
    fresh file) and keeps retrying until LOCK_RETRY_SECONDS have passed in all.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return action()
        except sqlite3.OperationalError as error:
            waited = time.monotonic() - started
            if not _is_lock_error(error) or waited >= limit_s:
                raise
            attempt += 1
            delay = min(0.002 * 2**attempt, 0.25) * random.uniform(0.5, 1.5)
            time.sleep(min(delay, limit_s - waited))


def _metric_value(value: object) -> float | None:
    """The value as a float, or None when it is not a real number (it is then skipped)."""
    if type(value) is float:
        return value
    if isinstance(value, numbers.Real):  # int, bool, numpy scalars, Fraction
        return float(value)
    return None


class ExperimentDB:
    """Runs, their metrics and their artifacts in one SQLite file.

    One connection per instance, shared by threads under a lock. Open one instance per
    process; several processes may open the same file at once.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = LOCK_RETRY_SECONDS) -> None:
        """`busy_timeout_s`: how long a call waits for another process's write lock before it
        fails (training uses a short one: its tracking is best effort)."""
        self.path = Path(path).expanduser()
        self.busy_timeout_s = float(busy_timeout_s)
        self.journal_mode = ""
        self._lock = threading.Lock()
        self._skipped_metric_names: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ExperimentDBError(
                f"{self.path}: cannot create the folder for the experiment database "
                f"({error}); choose a workspace you can write to."
            ) from error
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise ExperimentDBError(
                f"{self.path}: cannot open the experiment database ({error}); "
                "check the path is a file you can write to, or use a new workspace."
            ) from error
        try:
            self._open()
        except sqlite3.Error as error:
            self._conn.close()
            self._conn = None
            raise ExperimentDBError(
                f"{self.path}: cannot set up the experiment database ({error}); "
                "check the folder is writable, or use a new workspace."
            ) from error
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        conn = self._connection()
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        try:
            found_version = _retry_while_locked(
                lambda: conn.execute("PRAGMA user_version").fetchone()[0], self.busy_timeout_s
            )
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):
                raise  # locked for too long, unreadable, ...: reported by __init__
            raise ExperimentDBError(
                f"{self.path}: this file is not an experiment database ({error}). "
                "Use a new workspace, or move the file away and run again."
            ) from error
        self._refuse_newer(found_version)
        self._enable_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._write(self._create_schema)

    def _refuse_newer(self, found_version: int) -> None:
        if found_version > SCHEMA_VERSION:
            raise ExperimentDBError(
                f"{self.path}: the experiment database has schema version "
                f"{found_version}, newer than this package understands "
                f"({SCHEMA_VERSION}). Upgrade the package to open it, or use a new "
                "workspace."
            )

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        try:
            mode = self._set_journal_mode(conn, "WAL")
        except sqlite3.OperationalError as error:
            logger.warning(
                "%s: the filesystem refused WAL mode (%s); falling back to a rollback "
                "journal, so readers and writers will wait for each other.",
                self.path,
                error,
            )
            try:
                mode = self._set_journal_mode(conn, "DELETE")
            except sqlite3.OperationalError:
                mode = "unknown"
        else:
            if mode != "wal":
                logger.warning(
                    "%s: journal mode is %r, not WAL (the filesystem may not support "
                    "it); readers and writers will wait for each other.",
                    self.path,
                    mode,
                )
        self.journal_mode = mode

    @staticmethod
    def _set_journal_mode(conn: sqlite3.Connection, mode: str) -> str:
        found = _retry_while_locked(lambda: conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0])
        return str(found).lower()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # Checked again under the write lock: another process may have just created it.
        found_version = conn.execute("PRAGMA user_version").fetchone()[0]
        self._refuse_newer(found_version)
        if found_version < SCHEMA_VERSION:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ExperimentDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ExperimentDBError(f"{self.path}: this ExperimentDB is closed; open a new ExperimentDB.")
        return self._conn

    # ------------------------------------------------------------------ plumbing

    def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `work` in one BEGIN IMMEDIATE transaction, retried while locked."""

        def attempt() -> _T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        with self._lock:
            conn = self._connection()
            try:
                return _retry_while_locked(attempt, self.busy_timeout_s)
            except sqlite3.OperationalError as error:
                if not _is_lock_error(error):
                    raise
                raise ExperimentDBError(
                    f"{self.path}: the database stayed locked for over "
                    f"{self.busy_timeout_s:.0f}s ({error}). Another process is holding "
                    "a write transaction open; stop it or give this run its own "
                    "workspace, then retry."
                ) from error

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """All rows of one query, as sqlite3.Row (dict-like)."""
        with self._lock:
            conn = self._connection()
            return _retry_while_locked(lambda: conn.execute(sql, params).fetchall(), self.busy_timeout_s)

    def _read_tuples(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple]:
        """All rows of one query as plain tuples: much faster for many rows."""
        with self._lock:
            cursor = self._connection().cursor()
            cursor.row_factory = None
            return _retry_while_locked(lambda: cursor.execute(sql, params).fetchall(), self.busy_timeout_s)

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
