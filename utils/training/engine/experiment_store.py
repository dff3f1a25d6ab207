"""The SQLite file under ExperimentDB: its schema, opening it (WAL, schema version) and short
write transactions retried while another process holds the write lock."""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RUN_STATUSES = frozenset({"running", "completed", "interrupted", "failed", "recovered"})
LOCK_RETRY_SECONDS = 30.0

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


class SQLiteStore:
    """One SQLite file with the schema above: one connection per instance, shared by threads
    under a lock; several processes may open the same file at once."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = LOCK_RETRY_SECONDS) -> None:
        """`busy_timeout_s`: how long a call waits for another process's write lock before it
        fails (training uses a short one: its tracking is best effort)."""
        self.path = Path(path).expanduser()
        self.busy_timeout_s = float(busy_timeout_s)
        self.journal_mode = ""
        self._lock = threading.Lock()
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
