"""engine/run_search.py: every run across the search locations, newest first by the `saved_at` inside its
newest complete checkpoint; runs with nothing complete last; exactly the chosen run or an error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from utils.training.engine.checkpoint import NoCheckpointFound
from utils.training.engine.run_search import find_runs, inspect_run, recover_newest, recover_run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`older` in first/, then `newer` in second/ (trained after it)."""
    from utils.training.engine.trainer import Trainer

    base = tmp_path_factory.mktemp("runs")
    for folder, name in (("first", "older"), ("second", "newer")):
        Trainer(tiny_config(base / folder, run_name=name, epochs=1), resume="never", progress=False).fit()
    return base


def test_newest_across_locations_by_saved_at_not_file_times(two_runs: Path, tmp_path: Path) -> None:
    base = shutil.copytree(two_runs, tmp_path / "b")
    for path in (base / "first").rglob("*"):
        os.utime(path)  # the older run's files are now the most recently touched
    (base / "second" / "checkpoints" / "empty").mkdir()
    (base / "second" / "checkpoints" / "empty" / "run.json").write_text("{}")
    runs = find_runs([base / "first", base / "second"])
    assert [r.name for r in runs] == ["newer", "older", "empty"]
    assert runs[0].saved_at > runs[1].saved_at and runs[2].complete is False
    assert recover_newest([base / "first", base / "second"])["run_name"] == "newer"
    assert recover_newest([base / "first", base / "second"], run_name="older")["run_name"] == "older"


def test_a_run_is_listed_once_and_a_run_without_checkpoints_is_never_swapped(two_runs: Path, tmp_path: Path) -> None:
    base = shutil.copytree(two_runs, tmp_path / "b")
    runs = find_runs([base / "first", base / "first" / "checkpoints", base / "first" / "checkpoints" / "older"])
    assert [r.name for r in runs] == ["older"] and runs[0].location == str(base / "first")
    (base / "first" / "checkpoints" / "killed").mkdir()
    (base / "first" / "checkpoints" / "killed" / "run.json").write_text("{}")
    with pytest.raises(NoCheckpointFound, match="no complete checkpoint"):
        recover_run(inspect_run(base / "first" / "checkpoints" / "killed"))
    with pytest.raises(NoCheckpointFound, match="killed: no complete checkpoint"):
        recover_newest([base / "first" / "checkpoints" / "killed"])


def test_the_cli_recover_without_a_folder_takes_the_newest_across_the_default_places(two_runs: Path, tmp_path: Path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.copytree(two_runs / "first", cwd / "training_output")  # searched first
    shutil.copytree(two_runs / "second", cwd / "tmp_training_output")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-m", "utils.training", "recover", "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"run_name": "newer"' in done.stdout
