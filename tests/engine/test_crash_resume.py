"""Crash/resume: a real training process killed with SIGKILL at many moments resumes bit-identically."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.training.engine.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    NoCheckpointFound,
    list_checkpoints,
    read_model_file,
    read_training_state,
)
from utils.training.engine.commit import MANIFEST_NAME, TEMP_PREFIX, verify
from utils.training.engine.metrics_log import METRICS_FILE
from utils.training.engine.recovery import recover

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
RUN = "crash"
EPOCHS, STEPS_PER_EPOCH = 5, 20  # room for 16 kills on a busy machine, where each process may run several steps
# Columns that depend only on the computation, never on the clock.
DETERMINISTIC = ("train/loss", "val/loss", "grad_norm", "learning_rate", "drift/token_js", "drift/grad_norm_var")
TIMING = {"epoch_seconds", "tokens_per_second", "samples_per_second", "time"}


def train_command(workspace: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "utils.training", "train", "--preset", "tiny", "--workspace", str(workspace),
        "--run-name", RUN, "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS_PER_EPOCH),
        "--save-every-steps", "1", "--keep-last", "2", "--device", "cpu", "--json", *extra,
    ]  # fmt: skip


# The kill loops start many processes; paying Python's and torch's imports (seconds on two
# busy cores) for each would take minutes. A small launcher imports the package once and
# forks one real OS process per run, which runs the CLI's own `main()` with the same
# arguments as `python -m utils.training train ...`; that process is the one killed with
# SIGKILL. The uninterrupted reference run and the final resume use the real command line.
LAUNCHER = """
import json, os, sys
import utils.training.engine.trainer
from utils.training.__main__ import main
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        try:
            code = main(json.loads(line))
        except BaseException:
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Launcher:
    """Starts training processes (`start`) and reports how each one ended (`wait`)."""

    def __init__(self, log_path: Path) -> None:
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER], cwd=REPO_ROOT, env=ENV, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
        )  # fmt: skip
        self.pid: int | None = None
        self._returncode: int | None = None

    def start(self, workspace: Path) -> Launcher:
        self._proc.stdin.write(json.dumps(train_command(workspace)[3:]) + "\n")
        self.pid, self._returncode = int(self._proc.stdout.readline()), None
        return self

    def poll(self) -> int | None:
        """None while the training process runs (it is a zombie, not gone, until `wait`)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            alive = False
        return None if alive and self._returncode is None else 0

    def kill(self) -> int:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended (and was reaped) first
        return self.wait()

    def wait(self) -> int:
        if self._returncode is None:
            self._returncode = int(self._proc.stdout.readline())
        return self._returncode

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._log.close()


@pytest.fixture
def launcher(tmp_path: Path):
    opened = Launcher(tmp_path / "launcher.log")
    yield opened
    opened.close()


def run_to_completion(workspace: Path) -> None:
    done = subprocess.run(train_command(workspace), cwd=REPO_ROOT, env=ENV, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]


def holds_lock(run_dir: Path, pid: int) -> bool:
    try:
        return json.loads((run_dir / ".lock").read_text() or "{}").get("pid") == pid
    except (OSError, ValueError):
        return False


def newest_step(run_dir: Path) -> int:
    found = [s for s, p in list_checkpoints(run_dir) if (p / MANIFEST_NAME).exists()]
    return max(found, default=0)


def temp_folders(run_dir: Path) -> list[str]:
    try:
        return [n for n in os.listdir(run_dir) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return []


def wait_until(proc: Launcher, condition, timeout_s: float = 60.0) -> bool:
    """Poll `condition` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError(f"timed out after {timeout_s}s waiting on the training process")


def assert_nothing_partial_is_taken(run_dir: Path, workspace: Path) -> None:
    """After any crash: every folder that looks committed is whole, and recovery takes a
    checkpoint that passes the full hash check, with one metrics row per finished epoch."""
    for _, path in list_checkpoints(run_dir):
        if (path / MANIFEST_NAME).exists():  # a folder being deleted by retention loses its manifest first
            verify(path)
    try:
        results = recover(workspace, search_dirs=[], run_name=RUN)
    except NoCheckpointFound:
        assert newest_step(run_dir) == 0
        return
    assert not Path(results["checkpoint_path"]).name.startswith(TEMP_PREFIX)
    verify(Path(results["checkpoint_path"]))
    epochs = [row["epoch"] for row in results["metrics_history"]]
    assert epochs == list(range(1, results["epoch"] + 1)), epochs


def metrics_lines(run_dir: Path) -> list[dict]:
    """The raw log, line by line: a duplicate or phantom epoch would show here."""
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()]


def assert_bit_identical(run_dir: Path, reference_dir: Path) -> None:
    final = run_dir / f"step-{EPOCHS * STEPS_PER_EPOCH:06d}"
    expected = reference_dir / final.name
    weights, reference = read_model_file(final / MODEL_FILE), read_model_file(expected / MODEL_FILE)
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), f"weight {name} differs after crash/resume"
    state, ref_state = read_training_state(final / STATE_FILE), read_training_state(expected / STATE_FILE)
    for key, moments in ref_state["optimizer"]["state"].items():
        for which, tensor in moments.items():
            assert torch.equal(state["optimizer"]["state"][key][which], tensor), f"optimizer {key}/{which} differs"
    assert state["data"] == ref_state["data"]

    rows, ref_rows = metrics_lines(run_dir), metrics_lines(reference_dir)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)), "duplicate or missing epochs in metrics.jsonl"
    for row, ref in zip(rows, ref_rows, strict=True):
        assert set(DETERMINISTIC) <= set(ref)
        for column in set(ref) - TIMING:
            assert row[column] == ref[column], f"epoch {ref['epoch']}: {column} {row[column]!r} != {ref[column]!r}"


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_identical(tmp_path: Path, launcher: Launcher) -> None:
    reference_ws, workspace = tmp_path / "reference", tmp_path / "killed"
    run_dir, reference_dir = workspace / "checkpoints" / RUN, reference_ws / "checkpoints" / RUN
    reference = subprocess.Popen(  # the uninterrupted run, alongside the killed one
        train_command(reference_ws), cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    rng = random.Random(20240605)
    kills, kills_inside_saves, kills_before_training = 0, 0, 0
    while kills < 16:
        start_step = newest_step(run_dir)
        proc = launcher.start(workspace)
        if kills % 4 == 3:
            # Anywhere from taking the lock to the first steps: set-up, leftover clean-up, the
            # metrics log being cut back, the first save.
            wait_until(proc, lambda pid=proc.pid: holds_lock(run_dir, pid))
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            # In the steady state, where saves (one per step, written in the background) overlap the steps.
            wait_until(proc, lambda s=start_step: newest_step(run_dir) > s)
            time.sleep(rng.uniform(0.0, 0.1))
        returncode = proc.kill()
        if returncode == 0:
            break  # it finished before the kill landed
        assert returncode == -signal.SIGKILL, f"training failed on its own (exit {returncode})"
        kills += 1
        kills_inside_saves += bool(temp_folders(run_dir))
        kills_before_training += newest_step(run_dir) == start_step
        assert_nothing_partial_is_taken(run_dir, workspace)
    run_to_completion(workspace)
    print(f"{kills} SIGKILLs, {kills_inside_saves} inside a save, {kills_before_training} before a new save landed")
    assert kills >= 15

    assert reference.wait(timeout=180) == 0, reference.stderr.read().decode(errors="replace")[-2000:]
    reference.stderr.close()
    assert_bit_identical(run_dir, reference_dir)
    results = recover(workspace, search_dirs=[], run_name=RUN)
    assert [r["epoch"] for r in results["metrics_history"]] == list(range(1, EPOCHS + 1))
    assert results["completed"] and results["resume_count"] >= 1
    assert not temp_folders(run_dir)
    check = subprocess.run(
        [sys.executable, "-m", "utils.training", "verify", str(workspace)], cwd=REPO_ROOT, env=ENV, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_sigkill_inside_saves_never_yields_a_partial_checkpoint(tmp_path: Path, launcher: Launcher) -> None:
    workspace = tmp_path / "ws"
    run_dir = workspace / "checkpoints" / RUN
    landed_inside = 0
    for _ in range(6):
        proc = launcher.start(workspace)
        seen_at_start = set(temp_folders(run_dir))
        if not wait_until(proc, lambda seen=seen_at_start: bool(set(temp_folders(run_dir)) - seen)):
            break  # the run finished
        returncode = proc.kill()  # a save is being written right now
        if returncode == 0:
            break
        landed_inside += bool(temp_folders(run_dir))
        assert_nothing_partial_is_taken(run_dir, workspace)
    assert landed_inside >= 1, "no kill landed inside a save; the test proved nothing"
    run_to_completion(workspace)
    assert not temp_folders(run_dir), "a resumed run must clean up unfinished saves"
    assert [r["epoch"] for r in metrics_lines(run_dir)] == list(range(1, EPOCHS + 1))
    results = recover(workspace, search_dirs=[], run_name=RUN)
    assert results["completed"]
    for _, path in list_checkpoints(run_dir):
        verify(path)
