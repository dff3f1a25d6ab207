"""ExperimentDB benchmarks: batched metric inserts against raw sqlite3, and metrics_frame of a large run."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from utils.training.engine.experiment_db import ExperimentDB

from .common import entry, median

METRIC_NAMES = [f"metric/{i:02d}" for i in range(20)]


def metric_rows(points: int) -> list[tuple[int, int, str, float]]:
    """`points` rows of 20 metric names per step, as log_metrics_many takes them."""
    return [(i // 20, i // 2000, METRIC_NAMES[i % 20], i * 0.001) for i in range(points)]


def raw_sqlite_seconds(path: Path, rows: list[tuple[int, int, str, float]]) -> float:
    """The same rows into the same table and index with plain sqlite3 (WAL, synchronous=NORMAL,
    one transaction): the floor for any Python writer."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE metrics (run_id INTEGER NOT NULL, step INTEGER NOT NULL, epoch INTEGER NULL, "
            "name TEXT NOT NULL, value REAL, time REAL NOT NULL)"
        )
        conn.execute("CREATE INDEX metrics_by_run_name_step ON metrics (run_id, name, step)")
        start = time.perf_counter()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO metrics (run_id, step, epoch, name, value, time) VALUES (?, ?, ?, ?, ?, ?)",
            ((1, step, epoch, name, value, now) for step, epoch, name, value in rows),
        )
        conn.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        conn.close()


def bench_db(workdir: Path, points: int, repeats: int) -> dict[str, dict[str, Any]]:
    """db_points_per_second (one log_metrics_many call of `points` rows, against raw sqlite3)
    and db_metrics_frame_seconds (metrics_frame of that run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = metric_rows(points)
    engine_times, raw_times, frame_times = [], [], []
    frame_shape: tuple[int, int] = (0, 0)
    for r in range(repeats):
        for kind in ("db", "raw") if r % 2 == 0 else ("raw", "db"):
            if kind == "raw":
                raw_times.append(raw_sqlite_seconds(workdir / f"raw-{r}.db", rows))
                continue
            with ExperimentDB(workdir / f"db-{r}.db") as db:
                run_id = db.create_run("bench", {"preset": "tiny"}, str(workdir))
                start = time.perf_counter()
                db.log_metrics_many(run_id, rows)
                engine_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                frame = db.metrics_frame(run_id)
                frame_times.append(time.perf_counter() - start)
                frame_shape = frame.shape
    engine_pps = points / median(engine_times)
    raw_pps = points / median(raw_times)
    frame_seconds = median(frame_times)
    return {
        "db_points_per_second": entry(
            [points / t / 100_000 for t in engine_times],
            ">=",
            1.0,
            points_per_second=engine_pps,
            raw_sqlite_points_per_second=raw_pps,
            vs_raw_sqlite=engine_pps / raw_pps,
            points=points,
            repeats=repeats,
            method="per round: ExperimentDB.log_metrics_many points/s (one call, 20 names per step) / the 100,000 "
            "points/s target; raw sqlite3 executemany of the same rows into the same table and index beside it",
        ),  # fmt: skip
        "db_metrics_frame_seconds": entry(
            frame_times,
            "<=",
            0.5,
            seconds=frame_seconds,
            points=points,
            frame_rows=frame_shape[0],
            frame_columns=frame_shape[1],
            method="per round: seconds of ExperimentDB.metrics_frame(run) for the run just written (moved here "
            "from the timed test that tests/engine/test_experiment_db.py had)",
        ),  # fmt: skip
    }
