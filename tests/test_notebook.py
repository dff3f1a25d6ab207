"""training.ipynb in a real Jupyter kernel (nbclient), its cells run in the orders people really use:
analysis cells before anything, recovery with nothing on disk, recovery after a CLI run, recovery
twice, recovery then more training, and the whole notebook top to bottom. No cell may error.

Each scenario starts a fresh kernel in a private working folder, so the default search places
(./training_output, ./tmp_training_output) are the test's own; TRAINING_* variables steer the
cells as they would a headless run. Outputs are not compared here (nbval does that on the
committed notebook); what each cell printed is checked for what it must say.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "training.ipynb"
TAGS = (
    "setup",
    "parameters",
    "model",
    "training",
    "recovery",
    "dashboard",
    "diagnostic",
    "best-model",
    "csv-export",
    "inference",
)
ANALYSIS = ("dashboard", "diagnostic", "best-model", "csv-export", "inference")

pytestmark = pytest.mark.slow  # each scenario starts a kernel and imports torch


def cells_by_tag() -> dict[str, nbformat.NotebookNode]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = {}
    for cell in nb.cells:
        for tag in cell.metadata.get("tags", []):
            tagged[tag] = cell
    return tagged


def run_cells(order: list[str], cwd: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    """Run the notebook's cells with these tags, in this order, in one fresh kernel; returns
    (tag, everything the cell printed or displayed as text) per cell. Fails on any error output."""
    tagged = cells_by_tag()
    nb = nbformat.v4.new_notebook(metadata=nbformat.read(NOTEBOOK, as_version=4).metadata)
    for tag in order:
        cell = nbformat.v4.new_code_cell(tagged[tag].source)
        cell.metadata["tags"] = [tag]
        nb.cells.append(cell)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("TRAINING_")}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)
    texts = []
    for tag, cell in zip(order, nb.cells, strict=True):
        assert not [o for o in cell.outputs if o.output_type == "error"], f"cell {tag} raised"
        text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs)
        assert "Traceback" not in text, f"cell {tag} printed a traceback:\n{text}"
        texts.append((tag, text))
    return texts


@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained by the CLI (tiny preset, 2 epochs), as a user would leave it before a disconnect."""
    workspace = tmp_path_factory.mktemp("cli") / "W"
    done = subprocess.run(
        [sys.executable, "-m", "utils.training", "train", "--preset", "tiny", "--epochs", "2",
         "--workspace", str(workspace), "--run-name", "cli_run", "--save-every-seconds", "0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return workspace


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    folder = tmp_path / "cwd"
    folder.mkdir()
    return folder


@pytest.fixture
def workspace(cli_workspace: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "W"
    shutil.copytree(cli_workspace, copy)
    return copy


def recovered_rows(workspace: Path) -> list[tuple]:
    with sqlite3.connect(workspace / "experiments.db") as db:
        return db.execute("SELECT name, status, recovered_from FROM runs WHERE name LIKE '%_recovered'").fetchall()


def test_the_notebook_has_every_cell_role_tagged_once() -> None:
    tags = [t for c in nbformat.read(NOTEBOOK, as_version=4).cells for t in c.metadata.get("tags", [])]
    assert tags == list(TAGS)


def test_analysis_cells_before_anything_name_what_is_missing(cwd: Path) -> None:
    outputs = dict(run_cells(["setup", *ANALYSIS], cwd, {}))
    for tag in ("dashboard", "best-model", "csv-export", "inference"):
        assert "needs `results` (not defined)" in outputs[tag] and "Recovery cell" in outputs[tag], tag
    assert "❌ results (not defined)" in outputs["diagnostic"]
    assert not (cwd / "results").exists()


def test_recovery_with_nothing_on_disk_says_so_then_analysis_still_works(cwd: Path, tmp_path: Path) -> None:
    env = {"TRAINING_CHECKPOINT_DIR": str(tmp_path / "never-created")}
    outputs = dict(run_cells(["setup", "recovery", "diagnostic", "dashboard"], cwd, env))
    assert "TRAINING_CHECKPOINT_DIR=" in outputs["recovery"] and "does not exist" in outputs["recovery"]
    assert "clear it to search the usual places" in outputs["recovery"]
    assert "Next: the Recovery cell after a disconnect" in outputs["diagnostic"]


def test_recovery_after_a_cli_run_feeds_every_analysis_cell(cwd: Path, workspace: Path) -> None:
    outputs = dict(run_cells(["setup", "recovery", *ANALYSIS], cwd, {"TRAINING_CHECKPOINT_DIR": str(workspace)}))
    assert "✅ Recovered run 'cli_run'" in outputs["recovery"] and "from TRAINING_CHECKPOINT_DIR" in outputs["recovery"]
    assert "10 panels" in outputs["dashboard"] and (workspace / "results" / "cli_run_dashboard.png").is_file()
    assert "❌" not in outputs["diagnostic"] and "recovered from disk" in outputs["diagnostic"]
    assert "every hash verified" in outputs["best-model"]
    assert len(pd.read_csv(workspace / "results" / "cli_run_metrics.csv")) == 2
    assert "----- sample -----" in outputs["inference"]
    assert recovered_rows(workspace) == [("cli_run_recovered", "recovered", 1)]


def test_recovery_twice_reuses_its_record(cwd: Path, workspace: Path) -> None:
    outputs = run_cells(
        ["setup", "recovery", "recovery", "diagnostic"], cwd, {"TRAINING_CHECKPOINT_DIR": str(workspace)}
    )
    assert "recorded this session as run 2" in outputs[1][1] and "reused run 2" in outputs[2][1]
    assert "❌" not in outputs[3][1]
    assert recovered_rows(workspace) == [("cli_run_recovered", "recovered", 1)]


def test_recovery_then_training_resumes_the_run(cwd: Path, workspace: Path) -> None:
    env = {"TRAINING_CHECKPOINT_DIR": str(workspace), "TRAINING_WORKSPACE": str(workspace),
           "TRAINING_RUN_NAME": "cli_run", "TRAINING_EPOCHS": "3"}  # fmt: skip
    outputs = dict(run_cells(["setup", "recovery", "parameters", "training", "csv-export"], cwd, env))
    assert "resumed from" in outputs["training"] and "step-000040" in outputs["training"]
    assert "completed, 3 epoch(s)" in outputs["training"]
    assert list(pd.read_csv(workspace / "results" / "cli_run_metrics.csv")["epoch"]) == [1, 2, 3]


def test_the_whole_notebook_top_to_bottom(cwd: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "nb"
    env = {"TRAINING_WORKSPACE": str(workspace), "TRAINING_EPOCHS": "1", "TRAINING_PRESET": "tiny"}
    outputs = dict(run_cells(list(TAGS), cwd, env))
    assert "completed, 1 epoch(s)" in outputs["training"] and "Scratch" not in outputs["training"]
    assert "✅ Recovered run 'notebook_run'" in outputs["recovery"]
    assert (workspace / "results" / "notebook_run_dashboard.png").is_file()
    assert len(pd.read_csv(workspace / "results" / "notebook_run_metrics.csv")) == 1
    assert not (cwd / "tmp_training_output").exists()  # the scratch workspace is only the default


def test_committed_outputs_hold_with_other_runs_on_the_machine(cwd: Path, workspace: Path) -> None:
    """`make demo` then `make test`: a run left in ./training_output (and TRAINING_* variables naming other
    runs) must not change what the notebook under nbval shows, or its result would depend on the machine."""
    shutil.copytree(workspace, cwd / "training_output")  # where `make demo` leaves its run
    shutil.copytree(workspace, cwd / "tmp_training_output")
    env = {**os.environ, "TRAINING_CHECKPOINT_DIR": str(workspace), "TRAINING_RUN_NAME": "cli_run"}
    done = subprocess.run(
        [str(Path(__file__).with_name("run_nbval.sh")), sys.executable],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "10 passed" in done.stdout
    # The other runs were only read around, never touched.
    assert sorted(p.name for p in (cwd / "training_output" / "checkpoints" / "cli_run").iterdir()) == sorted(
        p.name for p in (workspace / "checkpoints" / "cli_run").iterdir()
    )


def test_a_warning_inside_a_cell_is_printed_as_text(cwd: Path) -> None:
    """Anything on stderr fails the notebook tests and shows red in a notebook: cells print warnings."""
    source = (
        "import warnings, logging\n"
        "from utils.training.cells._namespace import text_output\n"
        "@text_output\n"
        "def cell(ns):\n"
        "    warnings.warn('fonts are being cached')\n"
        "    logging.getLogger('utils.training.engine').warning('the database is busy')\n"
        "cell(globals())\n"
    )
    nb = nbformat.v4.new_notebook(metadata=nbformat.read(NOTEBOOK, as_version=4).metadata)
    nb.cells.append(nbformat.v4.new_code_cell(source))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = nb.cells[0].outputs
    assert [o.name for o in outputs if o.output_type == "stream"] == ["stdout"] * len(outputs)
    text = "".join(o.text for o in outputs)
    assert "⚠️ UserWarning: fonts are being cached" in text and "⚠️ the database is busy" in text


def cli_train(workspace: Path, run_name: str, seed: int = 1337) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "utils.training", "train", "--preset", "tiny", "--epochs", "1", "--seed", str(seed),
         "--workspace", str(workspace), "--run-name", run_name, "--save-every-seconds", "0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_which_run_parameters_first_then_newest_across_locations(cwd: Path, workspace: Path) -> None:
    """Issue 11, problems 2, 4, 5: Run All keeps the model and records nothing; after a restart the
    Parameters run is recovered although a newer one exists; with no Parameters run, the newest across
    every location, not the first location that has runs."""
    env = {"TRAINING_WORKSPACE": str(workspace), "TRAINING_RUN_NAME": "alpha", "TRAINING_EPOCHS": "1"}
    outputs = dict(run_cells(["setup", "parameters", "model", "training", "recovery", "diagnostic"], cwd, env))
    assert "✅ Recovered run 'alpha'" in outputs["recovery"] and "nothing recorded" in outputs["recovery"]
    assert "✅ model" in outputs["diagnostic"] and "trained in this session" in outputs["diagnostic"]
    assert recovered_rows(workspace) == []
    env["TRAINING_RUN_NAME"] = "cli_run"  # older than alpha
    outputs = dict(run_cells(["setup", "parameters", "recovery"], cwd, env))
    assert "✅ Recovered run 'cli_run'" in outputs["recovery"] and "the Parameters cell's run" in outputs["recovery"]
    shutil.copytree(workspace, cwd / "training_output")  # searched before ./tmp_training_output
    cli_train(cwd / "tmp_training_output", "newest")
    outputs = dict(run_cells(["setup", "recovery"], cwd, {}))
    assert "✅ Recovered run 'newest'" in outputs["recovery"]


def test_training_after_recovery_continues_the_recovered_run_with_its_own_config(cwd: Path, workspace: Path) -> None:
    """Issue 11, problem 3: Parameters plans alpha (seed 1337); Recovery of beta (seed 3); Training then
    continues beta with beta's config: no seed mismatch, not alpha."""
    cli_train(workspace, "beta", seed=3)
    env = {"TRAINING_WORKSPACE": str(workspace), "TRAINING_RUN_NAME": "alpha",
           "TRAINING_CHECKPOINT_DIR": str(workspace / "checkpoints" / "beta")}  # fmt: skip
    outputs = dict(run_cells(["setup", "parameters", "recovery", "training", "diagnostic"], cwd, env))
    assert "✅ Recovered run 'beta'" in outputs["recovery"]
    assert "Continuing the recovered run 'beta'" in outputs["training"] and "does not match" not in outputs["training"]
    assert "run name:   beta" in outputs["diagnostic"]
    assert not (workspace / "checkpoints" / "alpha").exists()


def test_a_given_folder_without_a_complete_checkpoint_is_strict(cwd: Path, workspace: Path) -> None:
    """Issue 11, problem 1: a folder given to Recovery with nothing complete is said; no other run is taken."""
    (workspace / "checkpoints" / "kill_early").mkdir()
    (workspace / "checkpoints" / "kill_early" / "run.json").write_text('{"run_name": "kill_early"}')
    shutil.copytree(workspace, cwd / "training_output")
    env = {"TRAINING_CHECKPOINT_DIR": str(workspace / "checkpoints" / "kill_early")}
    outputs = dict(run_cells(["setup", "recovery", "diagnostic"], cwd, env))
    assert "no complete checkpoint there" in outputs["recovery"] and "Recovered" not in outputs["recovery"]
    assert "❌ results (not defined)" in outputs["diagnostic"]
