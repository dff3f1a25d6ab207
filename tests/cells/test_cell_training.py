"""The Training cell: the namespace it leaves, resuming on a re-run, the scratch workspace, expected failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from utils.training.cells import _namespace, training
from utils.training.config import TrainingConfig
from utils.training.engine.experiment_db import ExperimentDB
from utils.training.engine.model import ByteTransformer


def test_after_training_the_namespace_holds_the_contract(train_ns, capsys) -> None:
    ns = train_ns()
    out = capsys.readouterr().out
    assert all(_namespace.problem(ns, name) is None for name in _namespace.REQUIRED_NAMES)
    results, frame = ns["results"], ns["metrics_df"]
    assert results["status"] == "completed" and results["recovered"] is False
    assert isinstance(frame, pd.DataFrame) and list(frame["epoch"]) == [1, 2]
    assert {"epoch", "train/loss", "val/loss", "val/perplexity", "learning_rate"} <= set(frame.columns)
    assert isinstance(ns["training_config"], TrainingConfig) and ns["config"] is ns["training_config"]
    assert ns["training_config"].run_dir == Path(results["run_dir"])
    assert isinstance(ns["model"], ByteTransformer) and isinstance(ns["db"], ExperimentDB)
    assert ns["db"].get_run(ns["run_id"])["status"] == "completed"
    assert isinstance(ns["drift_data"], list) and len(ns["drift_data"]) == 2
    assert "completed, 2 epoch(s)" in out and "Next: Dashboard" in out


def test_running_the_cell_again_resumes_instead_of_starting_over(train_ns, capsys) -> None:
    ns = train_ns()
    first = ns["results"]
    ns["planned_config"], ns["run_action"] = ns["planned_config"].replace(epochs=3), "parameters"
    training.run(ns, progress=False)
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-000008" in out
    assert [r["epoch"] for r in ns["results"]["metrics_history"]] == [1, 2, 3]
    assert ns["results"]["metrics_history"][:2] == first["metrics_history"]  # epochs 1-2 were not retrained


def test_the_scratch_workspace_is_cleared_and_said_so(make_config, capsys) -> None:
    leftover = Path("tmp_training_output") / "from-an-earlier-session.txt"
    leftover.parent.mkdir()
    leftover.write_text("old")
    ns: dict[str, Any] = {"planned_config": make_config("tmp_training_output"), "scratch_workspace": True}
    training.run(ns, progress=False)
    ns["db"].close()
    assert not leftover.exists() and ns["results"]["status"] == "completed"
    assert "Scratch workspace tmp_training_output: cleared" in capsys.readouterr().out
    assert ns["scratch_workspace"] is False  # a re-run continues the run instead of clearing it again


def test_a_workspace_the_user_chose_is_never_cleared(make_config, tmp_path: Path) -> None:
    keep = tmp_path / "mine" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    ns: dict[str, Any] = {"planned_config": make_config(tmp_path / "mine"), "scratch_workspace": True}
    training.run(ns, progress=False)
    ns["db"].close()
    assert keep.read_text() == "precious"


def test_without_the_parameters_cell_it_continues_the_run_in_the_namespace(train_ns, capsys) -> None:
    ns = train_ns()
    del ns["planned_config"]
    training.run(ns, progress=False)
    out = capsys.readouterr().out
    assert "Parameters cell not run" not in out and "resumed from" in out and "already complete" in out


def test_an_incompatible_checkpoint_is_reported_and_the_namespace_kept(train_ns, capsys) -> None:
    ns = train_ns()
    before = ns["results"]
    ns["planned_config"] = ns["planned_config"].replace(n_embd=32)  # same run, another model size
    ns["run_action"] = "parameters"
    training.run(ns, progress=False)
    out = capsys.readouterr().out
    assert "❌ Training stopped" in out and "n_embd=64" in out and "use the same model size" in out
    assert ns["results"] is before


def test_after_recovery_training_continues_the_recovered_run(recovered_ns: dict[str, Any], capsys) -> None:
    ns = recovered_ns
    ns["planned_config"], ns["run_action"] = ns["training_config"].replace(epochs=3), "parameters"
    capsys.readouterr()
    training.run(ns, progress=False)
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-000010" in out
    assert [r["epoch"] for r in ns["results"]["metrics_history"]] == [1, 2, 3]
