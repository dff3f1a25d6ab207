"""torchrun with two CPU processes (gloo): checkpoints through torch.distributed.checkpoint,
recovery, resume with another world size, and a rank SIGKILLed then restarted by torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.training.engine.checkpoint import read_model_file
from utils.training.engine.commit import verify
from utils.training.engine.recovery import recover

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINING_DIST_TIMEOUT": "30", "PYTHONUNBUFFERED": "1"}
TRAIN = ["-m", "utils.training", "train", "--preset", "tiny", "--run-name", "r", "--steps-per-epoch", "10"]


def torchrun(*args: str, nproc: int = 2, restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}", "--monitor-interval=0.2", *args,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_weights(workspace: Path) -> dict[str, torch.Tensor]:
    return read_model_file(Path(recover(workspace, search_dirs=[])["checkpoint_path"]) / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run, every checkpoint kept: the reference."""
    ws = tmp_path_factory.mktemp("ddp") / "ws"
    run(torchrun(*TRAIN, "--workspace", str(ws), "--epochs", "3", "--save-every-steps", "5", "--keep-last", "0"))
    return ws


def test_two_process_run_checkpoints_through_dcp_and_recovers(two_process_run: Path) -> None:
    results = recover(two_process_run, search_dirs=[])
    assert [row["epoch"] for row in results["metrics_history"]] == [1, 2, 3]
    assert results["step"] == 30 and results["completed"]
    ckpt = Path(results["checkpoint_path"])
    manifest = verify(ckpt)
    assert manifest["world_size"] == 2
    shards = sorted(n for n in manifest["files"] if n.startswith("dcp/") and n.endswith(".distcp"))
    assert shards == ["dcp/__0_0.distcp", "dcp/__1_0.distcp"]  # each rank wrote its own shard
    assert "training_state.rank-1.pt" in manifest["files"]
    proc = subprocess.run([sys.executable, "-m", "utils.training", "verify", str(two_process_run)], env=ENV)
    assert proc.returncode == 0
    # Only rank 0 logs: one line per epoch, no duplicates from rank 1.
    lines = (two_process_run / "checkpoints" / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_with_one_process_finishes(two_process_run: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    import shutil

    shutil.copytree(two_process_run, ws)
    for step_dir in (ws / "checkpoints" / "r").glob("step-*"):
        if int(step_dir.name[5:]) > 15:
            shutil.rmtree(step_dir)  # as if the job died at step 15
    proc = run([sys.executable, *TRAIN, "--workspace", str(ws), "--epochs", "3"])
    assert "resumed from" in proc.stderr and "step-000015" in proc.stderr
    results = recover(ws, search_dirs=[])
    assert results["completed"] and [r["epoch"] for r in results["metrics_history"]] == [1, 2, 3]
    assert results["metrics_history"][0] == recover(two_process_run, search_dirs=[])["metrics_history"][0]
    assert "dcp" not in verify(Path(results["checkpoint_path"]))["files"]  # written by one process


def test_resume_one_process_run_with_two(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    run([sys.executable, *TRAIN, "--workspace", str(ws), "--epochs", "1"])
    run(torchrun(*TRAIN, "--workspace", str(ws), "--epochs", "2"))
    results = recover(ws, search_dirs=[])
    assert results["completed"] and [r["epoch"] for r in results["metrics_history"]] == [1, 2]
    assert results["resume_count"] == 1
    assert verify(Path(results["checkpoint_path"]))["world_size"] == 2


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the training workers below a torchrun agent."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if ppid == agent_pid and b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry.name)
    return found


def test_rank_killed_restarts_and_matches_uninterrupted(two_process_run: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    run_dir = ws / "checkpoints" / "r"
    cmd = torchrun(*TRAIN, "--workspace", str(ws), "--epochs", "3", "--save-every-steps", "5", "--keep-last", "0",
                   restarts=1)  # fmt: skip
    agent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "step-000010").exists():
            assert agent.poll() is None, agent.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        workers = _worker_pids(agent.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = agent.communicate(timeout=180)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr  # the restarted workers continued from a checkpoint
    assert_same_weights(final_weights(ws), final_weights(two_process_run))
    reference = recover(two_process_run, search_dirs=[])["metrics_history"]
    resumed = recover(ws, search_dirs=[])["metrics_history"]
    for key in ("epoch", "step", "train/loss", "val/loss", "grad_norm", "learning_rate", "drift/token_js"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key


def test_the_notebook_recovery_cell_reads_a_torchrun_run(two_process_run: Path, tmp_path: Path) -> None:
    import shutil

    from utils.training.cells import recovery

    ws = tmp_path / "ws"
    shutil.copytree(two_process_run, ws)  # the cell writes to the workspace's ExperimentDB
    ns: dict = {}
    recovery.run(ns, checkpoint_directory=str(ws))
    assert ns["results"]["recovered"] and ns["results"]["completed"]
    assert list(ns["metrics_df"]["epoch"]) == [1, 2, 3]
    assert ns["training_config"].run_name == "r" and ns["config"] is ns["training_config"]
    assert ns["drift_data"] is not None
    ns["db"].close()


def test_a_user_task_under_torchrun_is_sharded_per_rank_and_resumes_exactly(tmp_path: Path) -> None:
    """--task under torchrun: the map-style dataset is sharded per rank (96 samples, batch 8, 2 ranks:
    6 steps an epoch), and a resume from a mid-epoch checkpoint ends as the uninterrupted run."""
    import shutil

    from utils.training.engine.checkpoint import list_checkpoints

    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(Path(__file__).parent / "user_tasks" / "mytask.py", folder / "mytask.py")
    args = ["-m", "utils.training", "train", "--task", "mytask:build", "--run-name", "r", "--epochs", "2",
            "--batch-size", "8", "--save-every-steps", "4", "--keep-last", "0"]  # fmt: skip

    def run_in(ws: Path) -> None:
        proc = subprocess.run(torchrun(*args, "--workspace", str(ws)), cwd=folder, env=ENV, capture_output=True,
                              text=True, timeout=180)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    run_in(tmp_path / "ref")
    reference = recover(tmp_path / "ref", search_dirs=[])
    assert reference["step"] == 12 and [r["step"] for r in reference["metrics_history"]] == [6, 12]
    shutil.copytree(tmp_path / "ref", tmp_path / "resumed")
    for step, path in list_checkpoints(tmp_path / "resumed" / "checkpoints" / "r"):
        if step > 4:
            shutil.rmtree(path)  # the job died after the checkpoint of step 4 (mid-epoch 1)
    run_in(tmp_path / "resumed")
    resumed = recover(tmp_path / "resumed", search_dirs=[])
    assert resumed["resume_count"] == 1
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "ref"))
    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "grad_norm", "learning_rate"):
        assert [r[key] for r in resumed["metrics_history"]] == [r[key] for r in reference["metrics_history"]], key
