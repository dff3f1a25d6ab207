"""Tests for the command line, run as real subprocesses: train, recover --json, verify, and failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RESULT_KEYS = {
    "run_name", "run_id", "workspace_root", "checkpoint_dir", "checkpoint_path", "best_checkpoint_path", "config",
    "metrics_history", "best_epoch", "drift_history", "recovered", "skipped",
}  # fmt: skip
pytestmark = pytest.mark.slow  # each command is a fresh interpreter that imports torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
ENV.pop("TRAINING_DEBUG", None)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "utils.training", *args],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {timeout} s; stderr: {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _finish(_start(list(args), cwd))


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's own command: a 2-epoch tiny run trained by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    workspace = root / "W"
    result = cli(
        "train", "--preset", "tiny", "--workspace", str(workspace), "--run-name", "r", "--epochs", "2", cwd=root
    )
    assert result.returncode == 0, result.stderr
    assert "run r" in result.stdout and "step 40 of 40" in result.stdout
    return workspace


def test_recover_json_prints_every_key_and_two_metric_rows(cli_workspace: Path):
    result = cli("recover", "--checkpoint-dir", str(cli_workspace), "--json", cwd=cli_workspace.parent)
    assert result.returncode == 0, result.stderr
    results: dict[str, Any] = json.loads(result.stdout)  # strict JSON: no NaN
    assert set(results) >= RESULT_KEYS
    assert [row["epoch"] for row in results["metrics_history"]] == [1, 2]
    assert results["run_name"] == "r" and results["recovered"] is True
    assert results["checkpoint_path"].endswith("step-000040")
    assert results["config"]["epochs"] == 2 and results["config"]["preset"] == "tiny"


def test_verify_exits_0_on_a_good_tree(cli_workspace: Path):
    result = cli("verify", str(cli_workspace), cwd=cli_workspace.parent)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines and all(line.startswith("ok") for line in lines)
    assert any(line.endswith("step-000040") for line in lines)


def test_failures_print_one_line_and_exit_non_zero(cli_workspace: Path, tmp_path: Path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(cli_workspace, corrupt)
    weights = corrupt / "checkpoints" / "r" / "step-000040" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    fresh = tmp_path / "fresh"
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    # started together: each pays the interpreter start-up, not one after the other
    procs = {
        "recover missing": _start(["recover", "--checkpoint-dir", str(missing)], tmp_path),
        "recover empty": _start(["recover", "--checkpoint-dir", str(empty), "--json"], tmp_path),
        "bad config": _start(["train", "--preset", "tiny", "--workspace", str(fresh), "--epochs", "0"], tmp_path),
        "verify corrupt": _start(["verify", str(corrupt)], tmp_path),
    }
    results = {name: _finish(proc) for name, proc in procs.items()}

    line = _one_error_line(results["recover missing"])
    assert str(missing) in line and "does not exist" in line
    line = _one_error_line(results["recover empty"])
    assert str(empty) in line and "no complete checkpoint" in line
    assert results["recover empty"].stdout == ""  # --json prints nothing half-made
    line = _one_error_line(results["bad config"])
    assert "epochs=0" in line and "[1, 100000]" in line
    assert not fresh.exists()  # nothing was created for a refused config
    line = _one_error_line(results["verify corrupt"])
    assert str(weights) in line and "hash" in line
    assert "FAIL" in results["verify corrupt"].stdout and "ok" in results["verify corrupt"].stdout
