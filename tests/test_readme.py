"""Every snippet of the README's Task API, loop-level API and --task sections runs as written: the
Python blocks in a fresh interpreter, the shell lines through bash. (The examples section's
commands are run, killed and resumed by tests/test_examples.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
BLOCK = re.compile(r"<!-- readme-test: (\S+) -->\n```(\w+)\n(.*?)```", re.DOTALL)


def snippets() -> dict[str, str]:
    return {name: body for name, _, body in BLOCK.findall((REPO_ROOT / "README.md").read_text(encoding="utf-8"))}


def run(code: str, cwd: Path, *, shell: bool = False) -> subprocess.CompletedProcess:
    args = ["bash", "-euo", "pipefail", "-c", code.replace("python ", f"{sys.executable} ")] if shell else [
        sys.executable, "-c", code]  # fmt: skip
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_the_readme_has_every_tested_snippet() -> None:
    assert set(snippets()) == {"mytask.py", "task-cli", "task-python", "loop-api", "examples"}


@pytest.mark.slow
def test_the_task_api_snippets_run(tmp_path: Path) -> None:
    blocks = snippets()
    (tmp_path / "mytask.py").write_text(blocks["mytask.py"], encoding="utf-8")
    cli = run(blocks["task-cli"], tmp_path, shell=True)
    assert "val/accuracy" in cli.stdout and "run mine" in cli.stdout
    assert (tmp_path / "training_output" / "checkpoints" / "mine" / "steps.jsonl").exists()
    again = run(blocks["task-cli"].splitlines()[0], tmp_path, shell=True)  # a finished run: nothing retrained
    assert "step 12 of 12" in again.stdout
    out = run(blocks["task-python"], tmp_path).stdout.split()
    assert 0.0 <= float(out[0]) <= 1.0 and "mine-py" in out[1]


@pytest.mark.slow
def test_the_loop_api_snippet_runs_and_continues(tmp_path: Path) -> None:
    code = snippets()["loop-api"]
    run(code, tmp_path)
    assert run(code + "\nprint(step)", tmp_path).stdout.split() == ["200"]  # run again: restored, nothing retrained
    run_dir = tmp_path / "training_output" / "checkpoints" / "my-loop"
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000150", "step-000200"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]  # the second run restored step 200: nothing logged twice
