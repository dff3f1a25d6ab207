"""Issue 10, the experiment database in training (items 8, 13, 14, 16) and leftover log temp
files (item 18): tracking is best effort, never the reason a run stops, and heals later."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from utils.training.config import TrainingConfig
from utils.training.engine import tracking
from utils.training.engine.checkpoint import list_checkpoints
from utils.training.engine.commit import verify
from utils.training.engine.experiment_db import ExperimentDB
from utils.training.engine.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def db_warnings(trainer: Trainer) -> list[str]:
    return [m for m in trainer.messages if m.startswith("experiment database")]


# -- item 8: a database that cannot be opened ------------------------------------------------
def test_a_database_that_cannot_open_warns_once_and_the_next_open_back_fills(tmp_path: Path, make_config) -> None:
    config = make_config(tmp_path / "ws", epochs=2, steps_per_epoch=3)
    config.db_path.mkdir(parents=True)  # SQLite cannot open a folder: as a mount that refuses locking
    trainer = Trainer(config, progress=False)
    results = trainer.fit()
    assert results["status"] == "completed" and results["step"] == 6
    assert len(db_warnings(trainer)) == 1 and "training continues" in db_warnings(trainer)[0]
    assert metrics_steps(config.run_dir) == [3, 6]  # the source of truth is complete
    config.db_path.rmdir()
    longer = config.replace(epochs=3)
    results = Trainer(longer, progress=False).fit()
    with ExperimentDB(config.db_path) as db:
        (run,) = db.list_runs()
        assert db.metric_steps(run["id"]) == {3, 6, 9}  # epochs 1-2 back-filled from the run's own history
        assert run["status"] == "completed"


# -- item 13: a busy database --------------------------------------------------------------
HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE IF NOT EXISTS held (x)")
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO held VALUES (1)")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_busy_database_never_stops_training(tmp_path: Path, make_config, monkeypatch) -> None:
    monkeypatch.setattr(tracking, "BUSY_TIMEOUT_S", 0.5)  # the wait before giving up; 5 s by default
    config = make_config(tmp_path / "ws", epochs=2, steps_per_epoch=3, keep_last=0)
    config.db_path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(config.db_path), "120"], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        trainer = Trainer(config, progress=False)
        started = time.monotonic()
        results = trainer.fit()
        assert time.monotonic() - started < 60
    finally:
        holder.kill()
        holder.wait()
    assert results["status"] == "completed"
    assert [s for s, _ in list_checkpoints(config.run_dir)] == [6, 3]  # every epoch's checkpoint written
    assert len(db_warnings(trainer)) == 1
    assert "locked" in db_warnings(trainer)[0] or "busy" in db_warnings(trainer)[0].lower()


# -- item 14: a full disk with on_save_error=continue -------------------------------------------
@pytest.fixture
def tmpfs_workspace(tmp_path: Path):
    mount_point = tmp_path / "ws"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({done.stderr.decode().strip()}): needs root where mount is allowed")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_continue_survives_a_full_disk_for_metrics_and_database(tmp_path: Path, tmpfs_workspace: Path) -> None:
    settings = dict(workspace_root=str(tmpfs_workspace), run_name="r", epochs=4, steps_per_epoch=4, eval_batches=2,
                    batch_size=4, corpus_max_bytes=400_000, save_every_seconds=0, keep_last=0, device="cpu",
                    on_save_error="continue")  # fmt: skip
    config_path = tmp_path / "config.json"
    config_path.write_text(TrainingConfig.from_preset("tiny", **settings).to_json())
    run_dir = tmpfs_workspace / "checkpoints" / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "utils.training", "train", "--config", str(config_path)],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list_checkpoints(run_dir) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    stop = threading.Event()

    def fill() -> None:  # keep the filesystem completely full
        with open(tmpfs_workspace / "filler", "ab", buffering=0) as f:
            while not stop.is_set():
                try:
                    f.write(b"\0" * (1 << 16))
                except OSError:
                    stop.wait(0.001)

    filler = threading.Thread(target=fill, daemon=True)
    filler.start()
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        stop.set()
        filler.join()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "training continues" in err
    for _, path in list_checkpoints(run_dir):
        verify(path)


# -- item 16: the database run follows the checkpoint --------------------------------------------
def test_an_unreadable_run_json_keeps_the_database_run_of_the_checkpoint(
    workspace_copy: Path, trained_workspace
) -> None:
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy), epochs=3)
    run_dir = config.run_dir
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    (run_dir / "run.json").write_bytes(b"\x00garbage{")
    Trainer(config, progress=False).fit()
    with ExperimentDB(config.db_path) as db:
        runs = [r for r in db.list_runs() if r["name"] == config.run_name]
    assert [r["id"] for r in runs] == [run_id], "a second database run split the history"
    assert runs[0]["resume_count"] >= 1 and runs[0]["status"] == "completed"
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run_id


def test_a_run_that_died_while_starting_is_not_left_running(tmp_path: Path, make_config) -> None:
    config = make_config(tmp_path / "ws", epochs=1, steps_per_epoch=2)
    config.db_path.parent.mkdir(parents=True)
    with ExperimentDB(config.db_path) as db:  # what a kill between the database row and run.json leaves
        dead = db.create_run(config.run_name, config.to_dict(), str(config.workspace_root))
    Trainer(config, progress=False).fit()
    with ExperimentDB(config.db_path) as db:
        assert db.get_run(dead)["status"] == "failed"
        statuses = sorted(r["status"] for r in db.list_runs())
    assert statuses == ["completed", "failed"]


# -- item 18: a metrics temp file left by a kill before its rename --------------------------------
def test_a_leftover_metrics_temp_file_is_cleaned_up(workspace_copy: Path, trained_workspace) -> None:
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy), epochs=3)
    leftover = config.run_dir / ".metrics.jsonl.tmp-99999"
    leftover.write_text('{"epoch": 1}\n')
    Trainer(config, progress=False).fit()
    assert not leftover.exists()
    assert not [p for p in config.run_dir.iterdir() if ".tmp-" in p.name]
