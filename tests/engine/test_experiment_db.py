"""Tests for ExperimentDB: real SQLite files in tmp_path, real processes for concurrency."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from utils.training.engine.experiment_db import (
    SCHEMA_VERSION,
    ExperimentDB,
    ExperimentDBError,
    RunNotFound,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path):
    with ExperimentDB(tmp_path / "experiments.db") as opened:
        yield opened


# ---------------------------------------------------------------- opening the file


def test_creates_parent_folders_and_turns_on_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "experiments.db"
    with ExperimentDB(path) as db:
        assert db.path == path
        assert db.journal_mode == "wal"
        db.create_run("r", {}, str(tmp_path))
    assert path.is_file()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "experiments.db"
    with ExperimentDB(path) as db:
        run_id = db.create_run("r", {"lr": 0.1}, "ws")
        db.log_metrics(run_id, 1, 0, {"loss": 2.5})
    with ExperimentDB(path) as db:
        assert db.get_run(run_id)["config"] == {"lr": 0.1}
        assert db.metrics_frame(run_id)["loss"].tolist() == [2.5]


def test_newer_schema_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "experiments.db"
    ExperimentDB(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(ExperimentDBError) as caught:
        ExperimentDB(path)
    message = str(caught.value)
    assert str(path) in message
    assert "upgrade" in message.lower()


def test_garbage_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "experiments.db"
    garbage = b"this is not a database, just some bytes\n" * 50
    path.write_bytes(garbage)
    with pytest.raises(ExperimentDBError) as caught:
        ExperimentDB(path)
    message = str(caught.value)
    assert str(path) in message
    assert "new workspace" in message or "move the file" in message
    assert path.read_bytes() == garbage


def test_closed_db_refuses_work_and_close_is_idempotent(tmp_path: Path) -> None:
    with ExperimentDB(tmp_path / "experiments.db") as db:
        run_id = db.create_run("r", {}, "ws")
    db.close()
    with pytest.raises(ExperimentDBError, match="closed"):
        db.get_run(run_id)


# ---------------------------------------------------------------- runs


def test_create_get_find_list_runs(db: ExperimentDB) -> None:
    config = {"lr": 3e-4, "layers": [2, 4], "nested": {"amp": True, "tag": None}}
    before = time.time()
    first = db.create_run("baseline", config, "/ws/one")
    second = db.create_run("other", {}, "/ws/two", status="recovered")
    third = db.create_run("baseline", {"lr": 1e-3}, "/ws/three")

    run = db.get_run(first)
    assert run["id"] == first
    assert run["name"] == "baseline"
    assert run["config"] == config
    assert run["workspace"] == "/ws/one"
    assert run["status"] == "running"
    assert run["finished_at"] is None
    assert run["recovered_from"] is None
    assert run["resume_count"] == 0
    assert before <= run["created_at"] <= run["updated_at"] <= time.time()
    assert db.get_run(second)["status"] == "recovered"

    assert db.find_run("baseline")["id"] == third
    assert db.find_run("baseline")["config"] == {"lr": 1e-3}
    assert db.find_run("missing") is None
    assert db.get_run(third + 100) is None
    assert [r["id"] for r in db.list_runs()] == [first, second, third]
    assert [r["name"] for r in db.list_runs()] == ["baseline", "other", "baseline"]


def test_status_and_finished_at(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    db.set_status(run_id, "interrupted")
    assert db.get_run(run_id)["status"] == "interrupted"
    assert db.get_run(run_id)["finished_at"] is None

    before = time.time()
    db.set_status(run_id, "completed", finished=True)
    run = db.get_run(run_id)
    assert run["status"] == "completed"
    assert before <= run["finished_at"] <= time.time()

    with pytest.raises(ValueError, match="unknown run status"):
        db.set_status(run_id, "exploded")
    with pytest.raises(RunNotFound):
        db.set_status(run_id + 1, "failed")


def test_mark_resumed_counts_and_sets_running(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    db.set_status(run_id, "interrupted", finished=True)
    assert db.mark_resumed(run_id) == 1
    run = db.get_run(run_id)
    assert (run["status"], run["resume_count"], run["finished_at"]) == (
        "running",
        1,
        None,
    )
    db.set_status(run_id, "failed")
    assert db.mark_resumed(run_id) == 2
    assert db.get_run(run_id)["resume_count"] == 2
    with pytest.raises(RunNotFound):
        db.mark_resumed(run_id + 1)


def test_recovered_from_links_runs(db: ExperimentDB) -> None:
    original = db.create_run("r", {}, "ws")
    db.set_status(original, "interrupted")
    successor = db.create_run("r", {}, "ws", recovered_from=original)
    assert db.get_run(successor)["recovered_from"] == original
    with pytest.raises(RunNotFound):
        db.create_run("r", {}, "ws", recovered_from=successor + 50)
    assert len(db.list_runs()) == 2


# ---------------------------------------------------------------- metrics


def test_log_metrics_and_wide_frame(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    other = db.create_run("other", {}, "ws")
    db.log_metrics(run_id, 20, 1, {"loss": 1.5, "lr": 0.01, "note": "text"})
    db.log_metrics(run_id, 10, 0, {"loss": 2.5, "lr": 0.02, "clipped": True})
    db.log_metrics(run_id, 30, 1, {"loss": 1, "lr": 0.005})
    db.log_metrics(other, 10, 0, {"loss": 99.0})

    frame = db.metrics_frame(run_id)
    assert list(frame.columns) == ["step", "epoch", "clipped", "loss", "lr"]
    assert frame["step"].tolist() == [10, 20, 30]
    assert frame["epoch"].tolist() == [0, 1, 1]
    assert frame["loss"].tolist() == [2.5, 1.5, 1.0]
    assert frame["lr"].tolist() == [0.02, 0.01, 0.005]
    assert frame["clipped"].iloc[0] == 1.0
    assert frame["clipped"].iloc[1:].isna().all()
    assert db.metrics_frame(other)["loss"].tolist() == [99.0]


def test_metrics_frame_when_nothing_logged(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    frame = db.metrics_frame(run_id)
    assert isinstance(frame, pd.DataFrame)
    assert frame.empty
    assert list(frame.columns) == ["step", "epoch"]


def test_non_finite_values_come_back_as_themselves(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    db.log_metrics(
        run_id,
        1,
        0,
        {"nan": float("nan"), "inf": float("inf"), "neg": float("-inf"), "ok": 1.0},
    )
    row = db.metrics_frame(run_id).iloc[0]
    assert math.isnan(row["nan"])
    assert row["inf"] == math.inf
    assert row["neg"] == -math.inf
    assert row["ok"] == 1.0


def test_step_and_epoch_names_do_not_become_metrics(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    db.log_metrics(run_id, 5, 2, {"epoch": 2, "step": 5, "loss": 0.5})
    frame = db.metrics_frame(run_id)
    assert list(frame.columns) == ["step", "epoch", "loss"]
    assert frame[["step", "epoch"]].values.tolist() == [[5, 2]]


def test_rows_without_epoch_and_relogged_values(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    db.log_metrics(run_id, 1, None, {"loss": 3.0})
    db.log_metrics(run_id, 2, None, {"loss": 2.0})
    db.log_metrics(run_id, 2, None, {"loss": 1.75})  # the later value wins
    frame = db.metrics_frame(run_id)
    assert frame["step"].tolist() == [1, 2]
    assert frame["epoch"].isna().all()
    assert frame["loss"].tolist() == [3.0, 1.75]


def test_log_metrics_many_and_unknown_run(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    db.log_metrics_many(run_id, [(s, s // 2, name, s * 1.0) for s in range(4) for name in ("a", "b")])
    frame = db.metrics_frame(run_id)
    assert frame.shape == (4, 4)
    assert frame["b"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert frame["epoch"].tolist() == [0, 0, 1, 1]
    with pytest.raises(RunNotFound, match=str(run_id + 1)):
        db.log_metrics(run_id + 1, 0, 0, {"loss": 1.0})


def test_delete_metrics_after_leaves_no_phantom_rows(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")
    other = db.create_run("other", {}, "ws")
    for step in range(10):
        db.log_metrics(run_id, step, step // 5, {"loss": 10.0 - step, "lr": 0.1})
        db.log_metrics(other, step, 0, {"loss": 1.0})

    assert db.delete_metrics_after(run_id, 4) == 10  # steps 5..9, two names each
    assert db.metrics_frame(run_id)["step"].tolist() == [0, 1, 2, 3, 4]
    assert len(db.metrics_frame(other)) == 10

    db.log_metrics(run_id, 5, 1, {"loss": -1.0, "lr": 0.05})  # the resumed run
    frame = db.metrics_frame(run_id)
    assert frame["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert frame.iloc[-1][["loss", "lr"]].tolist() == [-1.0, 0.05]


def test_bulk_insert_and_wide_frame_of_100k_points(db: ExperimentDB) -> None:
    """Correctness only: the speed of this path is `db_points_per_second` and `db_metrics_frame_seconds`
    in `python -m benchmarks`."""
    run_id = db.create_run("r", {}, "ws")
    names = [f"m{i}" for i in range(10)]
    rows = [(step, step // 1000, name, step * 0.5) for step in range(10_000) for name in names]
    db.log_metrics_many(run_id, rows)
    frame = db.metrics_frame(run_id)
    assert frame.shape == (10_000, 12)
    assert frame["m3"].iloc[-1] == 9_999 * 0.5


# ---------------------------------------------------------------- artifacts


def test_artifacts_round_trip(db: ExperimentDB, tmp_path: Path) -> None:
    run_id = db.create_run("r", {}, "ws")
    other = db.create_run("other", {}, "ws")
    checkpoint = tmp_path / "step-000500"
    first = db.log_artifact(run_id, "checkpoint", checkpoint, step=500, meta={"val/loss": 1.2})
    second = db.log_artifact(run_id, "csv", "results/metrics.csv")

    found = db.artifacts(run_id)
    assert [a["id"] for a in found] == [first, second]
    assert found[0]["kind"] == "checkpoint"
    assert found[0]["path"] == str(checkpoint)
    assert found[0]["step"] == 500
    assert found[0]["meta"] == {"val/loss": 1.2}
    assert found[0]["run_id"] == run_id
    assert (found[1]["step"], found[1]["meta"]) == (None, None)
    assert db.artifacts(other) == []
    with pytest.raises(RunNotFound):
        db.log_artifact(other + 10, "csv", "x.csv")


# ---------------------------------------------------------------- concurrency


def test_threads_sharing_one_instance_lose_nothing(db: ExperimentDB) -> None:
    run_id = db.create_run("r", {}, "ws")

    def write(tag: str) -> None:
        for step in range(250):
            db.log_metrics(run_id, step, 0, {tag: float(step)})

    threads = [threading.Thread(target=write, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    frame = db.metrics_frame(run_id)
    assert frame.shape == (250, 6)
    assert not frame.isna().any().any()


WRITER = """
import sys, time
from pathlib import Path
from utils.training.engine.experiment_db import ExperimentDB

db_path, tag, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
(folder / f"ready-{tag}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
with ExperimentDB(db_path) as db:  # both processes set up the fresh file at once
    run_id = db.create_run(tag, {"writer": tag}, str(folder))
    (folder / f"opened-{tag}").touch()
    while len(list(folder.glob("opened-*"))) < 2:  # start writing together
        time.sleep(0.001)
    started = time.time()
    for step in range(1000):  # 1,000 transactions of 2 rows each
        db.log_metrics(run_id, step, 0, {"loss": step * 1.0, "acc": step / 1000})
    finished = time.time()
print(run_id, started, finished)
"""


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    db_path = tmp_path / "shared" / "experiments.db"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db_path), tag, str(tmp_path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("p0", "p1")
    ]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready-{tag}").exists() for tag in ("p0", "p1")):
        assert time.monotonic() < deadline, "writer processes did not start"
        time.sleep(0.005)
    (tmp_path / "go").touch()

    spans = {}
    for tag, writer in zip(("p0", "p1"), writers, strict=True):
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        run_id, started, finished = out.split()
        spans[tag] = (int(run_id), float(started), float(finished))
    # The test only means something if the two writers really overlapped.
    assert max(s[1] for s in spans.values()) < min(s[2] for s in spans.values())

    with ExperimentDB(db_path) as db:
        assert sorted(r["name"] for r in db.list_runs()) == ["p0", "p1"]
        total = 0
        for run_id, _, _ in spans.values():
            frame = db.metrics_frame(run_id)
            assert frame["step"].tolist() == list(range(1000))
            assert frame["loss"].tolist() == [float(s) for s in range(1000)]
            assert not frame["acc"].isna().any()
            total += 2 * len(frame)
        assert total == 4000
