"""The shared namespace helper: what counts as present, what the check prints, what publish sets."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from utils.training.cells import _namespace
from utils.training.config import TrainingConfig


def test_check_on_an_empty_namespace_names_every_missing_variable_and_the_cell_to_run(capsys) -> None:
    assert _namespace.check({}, ["results", "training_config"], cell="Dashboard") is False
    out = capsys.readouterr().out
    assert "Dashboard cell needs `results` (not defined), `training_config` (not defined)" in out
    assert "Recovery cell" in out and "Training cell" in out


def test_check_passes_silently_when_everything_is_usable(capsys, recovered_ns: dict[str, Any]) -> None:
    capsys.readouterr()  # the Recovery cell's own report
    assert _namespace.check(recovered_ns, _namespace.REQUIRED_NAMES, cell="X") is True
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("results", None, "is None"),
        ("results", [], "is a list, not the results dict"),
        ("metrics_df", {"epoch": [1]}, "is a dict, not a pandas DataFrame"),
        ("training_config", {"run_name": "x"}, "is a dict, not a TrainingConfig"),
        ("workspace_root", "", "is a str, not a folder path"),
    ],
)
def test_problem_explains_a_wrong_value(name: str, value: Any, expected: str) -> None:
    assert _namespace.problem({name: value}, name).startswith(expected)


def test_problem_accepts_the_real_types() -> None:
    ns = {"metrics_df": pd.DataFrame(), "training_config": TrainingConfig(), "workspace_root": "."}
    assert all(_namespace.problem(ns, name) is None for name in ns)


def test_an_empty_override_counts_as_unset(monkeypatch) -> None:
    monkeypatch.setenv("TRAINING_EPOCHS", "  ")
    assert _namespace.env_value("TRAINING_EPOCHS") is None
    monkeypatch.setenv("TRAINING_EPOCHS", "3")
    assert _namespace.env_value("TRAINING_EPOCHS") == "3"


def test_publish_sets_the_contract_and_drops_a_model_of_another_run(recovered_ns: dict[str, Any]) -> None:
    ns: dict[str, Any] = {"model": object()}
    results = recovered_ns["results"]
    _namespace.publish(ns, results, recovered_ns["training_config"], db=None, run_id=7, model=None)
    assert "model" not in ns
    assert ns["config"] is ns["training_config"]
    assert list(ns["metrics_df"]["epoch"]) == [r["epoch"] for r in results["metrics_history"]]
    assert ns["drift_data"] == results["drift_history"] and ns["run_id"] == 7
    assert ns["workspace_root"] == results["workspace_root"]
