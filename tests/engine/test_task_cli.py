"""`python -m utils.training train --task mytask:build` on a user-written task (BatchNorm, dropout,
a shuffled map-style dataset), SIGKILLed several times and resumed with the same command, ends
bit-identical to an uninterrupted run; recover, dashboard and export show its accuracy."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.training.engine.checkpoint import MODEL_FILE, list_checkpoints, read_model_file
from utils.training.engine.metrics_log import METRICS_FILE, STEPS_FILE

USER_TASK = Path(__file__).parent / "user_tasks" / "mytask.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ENV.pop("PYTHONPATH", None)
TIMING = {"epoch_seconds", "samples_per_second", "time"}
EPOCHS, STEPS = 3, 36  # 96 samples / batch 8 = 12 steps an epoch


def command(workspace: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "utils.training", "train", "--task", "mytask:build", "--workspace", str(workspace),
            "--run-name", "mine", "--epochs", str(EPOCHS), "--batch-size", "8", "--save-every-steps", "1",
            "--keep-last", "2", "--device", "cpu", "--json", *extra]  # fmt: skip


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return found[0][0] if found else 0


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def task_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(USER_TASK, folder / "mytask.py")
    return folder


@pytest.mark.slow
def test_a_user_task_killed_several_times_resumes_bit_identical(task_folder: Path) -> None:
    reference_ws, killed_ws = task_folder / "reference", task_folder / "killed"
    reference = subprocess.Popen(command(reference_ws), cwd=task_folder, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    run_dir = killed_ws / "checkpoints" / "mine"
    rng = random.Random(7)
    kills = 0
    while kills < 3:
        start = newest_step(run_dir)
        proc = subprocess.Popen(command(killed_ws), cwd=task_folder, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 120
        while newest_step(run_dir) <= start and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
        proc.stderr.close()
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"training failed on its own (exit {code})"
        kills += 1
    assert kills >= 2, "the run finished before it could be killed twice"
    assert newest_step(run_dir) < STEPS
    done = subprocess.run(command(killed_ws), cwd=task_folder, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    results, ref_results = json.loads(done.stdout), json.loads(out)
    assert results["resume_count"] >= 1 and results["completed"]

    final = f"step-{STEPS:06d}"
    weights = read_model_file(run_dir / final / MODEL_FILE)
    ref_weights = read_model_file(reference_ws / "checkpoints" / "mine" / final / MODEL_FILE)
    assert weights.keys() == ref_weights.keys() and any("running_mean" in k for k in weights)
    for name, tensor in ref_weights.items():
        assert tensor.equal(weights[name]), f"{name} differs after SIGKILL + resume"
    rows, ref_rows = lines(run_dir / METRICS_FILE), lines(reference_ws / "checkpoints" / "mine" / METRICS_FILE)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row, ref in zip(rows, ref_rows, strict=True):
        assert {"train/accuracy", "val/accuracy", "val/loss", "learning_rate"} <= set(ref)
        assert {k: v for k, v in row.items() if k not in TIMING} == {k: v for k, v in ref.items() if k not in TIMING}
    steps, ref_steps = lines(run_dir / STEPS_FILE), lines(reference_ws / "checkpoints" / "mine" / STEPS_FILE)
    assert [s["step"] for s in steps] == [10, 20, 30]  # no duplicated or phantom step lines
    assert [{k: v for k, v in s.items() if k != "time"} for s in steps] == [
        {k: v for k, v in s.items() if k != "time"} for s in ref_steps
    ]
    assert ref_results["task"] == results["task"] == "mytask:build"
    assert json.loads((run_dir / "run.json").read_text())["task"] == "mytask:build"

    # The rest of the tools work on it and show the task's metric.
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "utils.training", *args, "--checkpoint-dir", str(killed_ws),
                               "--json"], cwd=task_folder, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip

    recovered = cli("recover")
    assert recovered.returncode == 0, recovered.stderr
    data = json.loads(recovered.stdout)
    assert data["metrics_history"][-1]["val/accuracy"] == ref_rows[-1]["val/accuracy"]
    assert [s["step"] for s in data["step_history"]] == [10, 20, 30]
    exported = cli("export")
    assert exported.returncode == 0, exported.stderr
    with open(json.loads(exported.stdout)["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert "val/accuracy" in table[0] and len(table) == EPOCHS
    dashboard = cli("dashboard")
    assert dashboard.returncode == 0, dashboard.stderr
    assert Path(json.loads(dashboard.stdout)["dashboard"]).stat().st_size > 10_000


def test_resume_without_the_recorded_builder_is_refused_naming_it(task_folder: Path) -> None:
    workspace = task_folder / "ws"
    first = subprocess.run(command(workspace, "--epochs", "1", "--steps-per-epoch", "2"), cwd=task_folder, env=ENV,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr
    args = [a for a in command(workspace, "--epochs", "2") if a not in ("--task", "mytask:build")]
    refused = subprocess.run(args, cwd=task_folder, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert "--task mytask:build" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
