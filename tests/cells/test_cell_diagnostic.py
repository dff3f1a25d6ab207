"""The Diagnostic cell: ✅/❌ for required names, ✅/⚪ for optional ones, the summary and the next cell."""

from __future__ import annotations

from typing import Any

from utils.training.cells import diagnostic


def test_an_empty_namespace_shows_every_required_name_missing(capsys) -> None:
    diagnostic.run({})
    out = capsys.readouterr().out
    for name in ("results", "metrics_df", "workspace_root", "training_config", "config"):
        assert f"❌ {name} (not defined)" in out
    for name in ("drift_data", "model", "db", "run_id"):
        assert f"⚪ {name} (not set)" in out
    assert "Session: no run loaded." in out and "Next: the Recovery cell after a disconnect" in out


def test_a_partial_namespace_points_at_the_cell_that_sets_everything(recovered_ns: dict[str, Any], capsys) -> None:
    ns = {"results": recovered_ns["results"], "training_config": {"run_name": "r"}}
    diagnostic.run(ns)
    out = capsys.readouterr().out
    assert "✅ results" in out and "❌ metrics_df (not defined)" in out
    assert "❌ training_config (is a dict, not a TrainingConfig" in out
    assert "run name:   r" in out and "Next: the Recovery cell (or the Training cell)" in out


def test_after_recovery_everything_required_is_set(recovered_ns: dict[str, Any], capsys) -> None:
    capsys.readouterr()
    diagnostic.run(recovered_ns)
    out = capsys.readouterr().out
    assert "❌" not in out and "⚪ model (not set)" in out and "✅ db" in out
    assert "epochs:     2 completed of 2" in out and "source:     recovered from disk" in out
    assert "step-000010" in out and "Next: the Dashboard cell" in out


def test_after_training_the_model_is_there_too(train_ns, capsys) -> None:
    ns = train_ns()
    diagnostic.run(ns)
    out = capsys.readouterr().out
    assert "✅ model" in out and "trained in this session" in out


def test_an_unfinished_run_suggests_training_to_finish_it(recovered_ns: dict[str, Any]) -> None:
    recovered_ns["results"]["completed"] = False
    assert diagnostic.next_cell(recovered_ns).startswith("the Training cell to finish the run")
