"""The Dashboard cell: nothing to show yet, the figure after recovery and after training, a failed write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_without_results_it_names_what_is_missing(capsys) -> None:
    from utils.training.cells import dashboard

    ns: dict[str, Any] = {}
    dashboard.run(ns)
    assert "Dashboard cell needs `results` (not defined)" in capsys.readouterr().out
    assert "dashboard_path" not in ns


def test_after_recovery_it_saves_ten_panels_under_results(recovered_ns: dict[str, Any], capsys) -> None:
    from utils.training.cells import dashboard

    dashboard.run(recovered_ns, show=False)
    out = capsys.readouterr().out
    expected = Path(recovered_ns["workspace_root"]) / "results" / "r_dashboard.png"
    assert recovered_ns["dashboard_path"] == str(expected)
    assert expected.read_bytes()[:8] == PNG_MAGIC
    assert "10 panels (6 training + 4 drift)" in out


def test_after_training_it_works_the_same(train_ns, capsys) -> None:
    from utils.training.cells import dashboard

    ns = train_ns()
    dashboard.run(ns, show=True)  # outside a notebook, display() prints the image's repr
    out = capsys.readouterr().out
    assert Path(ns["dashboard_path"]).is_file() and "IPython.core.display.Image" in out


def test_a_run_without_drift_gets_six_panels(recovered_ns: dict[str, Any], capsys) -> None:
    from utils.training.cells import dashboard

    results = recovered_ns["results"]
    results["drift_history"] = []
    for row in results["metrics_history"]:
        for key in [k for k in row if k.startswith("drift/")]:
            del row[key]
    dashboard.run(recovered_ns, show=False)
    assert "6 panels (training only" in capsys.readouterr().out


def test_no_completed_epoch_is_said_not_raised(recovered_ns: dict[str, Any], capsys) -> None:
    from utils.training.cells import dashboard

    recovered_ns["results"]["metrics_history"] = []
    dashboard.run(recovered_ns, show=False)
    assert "Nothing to plot yet" in capsys.readouterr().out


def test_an_unwritable_results_folder_is_reported(recovered_ns: dict[str, Any], capsys) -> None:
    from utils.training.cells import dashboard

    (Path(recovered_ns["workspace_root"]) / "results").write_text("a file where the folder should be")
    dashboard.run(recovered_ns, show=False)
    out = capsys.readouterr().out
    assert "❌ Could not write the dashboard" in out and "dashboard_path" not in recovered_ns


def test_a_one_epoch_dashboard_has_whole_epoch_ticks(recovered_ns: dict[str, Any]) -> None:
    """Issue 11, problem 8: no 0.945 ... 1.055 ticks, no bar filling the panel."""
    from utils.training.analysis import dashboard_figure

    results = {**recovered_ns["results"], "metrics_history": recovered_ns["results"]["metrics_history"][:1]}
    results["drift_history"] = results.get("drift_history", [])[:1]
    figure = dashboard_figure(results)
    for ax in figure.axes:
        if ax.get_xlabel() == "epoch" and ax.has_data():
            assert list(ax.get_xticks()) == [1.0], (ax.get_title(), list(ax.get_xticks()))
            assert ax.get_xlim() == (0.25, 1.75)
