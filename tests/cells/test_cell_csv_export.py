"""The CSV export cell: the file after recovery and training, the defaults, and a failed write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from utils.training.cells import csv_export


def test_without_metrics_it_names_what_is_missing(capsys) -> None:
    csv_export.run({})
    assert "CSV export cell needs `results`" in capsys.readouterr().out


def test_after_recovery_one_row_per_epoch_under_results(recovered_ns: dict[str, Any], capsys) -> None:
    csv_export.run(recovered_ns)
    path = Path(recovered_ns["workspace_root"]) / "results" / "r_metrics.csv"
    assert recovered_ns["csv_path"] == str(path)
    frame = pd.read_csv(path)
    assert list(frame["epoch"]) == [1, 2] and list(frame.columns[:4]) == ["epoch", "step", "train/loss", "val/loss"]
    assert frame["val/loss"].tolist() == [r["val/loss"] for r in recovered_ns["results"]["metrics_history"]]
    assert "2 row(s)" in capsys.readouterr().out


def test_after_training_it_uses_the_configs_run_name(train_ns) -> None:
    ns = train_ns(run_name="named_run")
    csv_export.run(ns)
    assert Path(ns["csv_path"]).name == "named_run_metrics.csv" and len(pd.read_csv(ns["csv_path"])) == 2


def test_missing_workspace_and_config_fall_back_to_defaults_said_aloud(
    recovered_ns: dict[str, Any], clean_session: Path, capsys
) -> None:
    ns = {"metrics_df": recovered_ns["metrics_df"]}
    capsys.readouterr()
    csv_export.run(ns)
    out = capsys.readouterr().out
    assert "workspace_root is missing" in out and "naming the file after 'training_run'" in out
    assert (clean_session / "results" / "training_run_metrics.csv").is_file()


def test_a_failed_write_is_reported_and_keeps_the_old_file(recovered_ns: dict[str, Any], capsys) -> None:
    import os

    csv_export.run(recovered_ns)
    path = Path(recovered_ns["csv_path"])
    good = path.read_bytes()
    # Something already sits where the temporary file would go, so the new write fails part way.
    (path.parent / f".{path.name}.tmp-{os.getpid()}").mkdir()
    recovered_ns["metrics_df"] = recovered_ns["metrics_df"].iloc[:1]
    csv_export.run(recovered_ns)
    out = capsys.readouterr().out
    assert "❌ Could not write" in out
    assert path.read_bytes() == good
