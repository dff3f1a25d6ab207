"""utils.training.analysis: the metrics table, the best epoch, the dashboard PNG, the CSV, safe
loading and sampling, and the CLI's dashboard/export subcommands that use them."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from utils.training import analysis
from utils.training.engine.checkpoint import read_model_file
from utils.training.engine.commit import CheckpointCorrupt
from utils.training.engine.recovery import recover

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results(workspace_copy: Path) -> dict[str, Any]:
    return recover(workspace_copy, search_dirs=[])


def without_drift(results: dict[str, Any]) -> dict[str, Any]:
    plain = copy.deepcopy(results)
    plain["drift_history"] = []
    plain["metrics_history"] = [
        {k: v for k, v in r.items() if not k.startswith("drift/")} for r in plain["metrics_history"]
    ]
    return plain


def test_metrics_frame_has_one_row_per_epoch_with_the_usual_columns_first(results: dict[str, Any]) -> None:
    shuffled = dict(results, metrics_history=list(reversed(results["metrics_history"])))
    frame = analysis.metrics_frame(shuffled)
    assert list(frame["epoch"]) == [1, 2]
    assert list(frame.columns[:5]) == ["epoch", "step", "train/loss", "val/loss", "val/perplexity"]
    drift_columns = [c for c in frame.columns if c.startswith("drift/")]
    assert drift_columns and list(frame.columns[-len(drift_columns) :]) == drift_columns
    assert analysis.metrics_frame({"metrics_history": []}).empty


def test_best_epoch_row_ignores_nan_and_inf_and_falls_back_to_the_last_epoch() -> None:
    frame = pd.DataFrame({"epoch": [1, 2, 3, 4], "val/loss": [3.0, math.nan, -math.inf, 2.5]})
    row, fell_back = analysis.best_epoch_row(frame)
    assert (row["epoch"], fell_back) == (4, False)
    row, fell_back = analysis.best_epoch_row(frame.assign(**{"val/loss": math.nan}))
    assert (row["epoch"], fell_back) == (4, True)
    row, fell_back = analysis.best_epoch_row(frame.drop(columns="val/loss"))
    assert (row["epoch"], fell_back) == (4, True)
    assert analysis.best_epoch_row(frame.iloc[:0]) == (None, False)


def test_the_dashboard_has_ten_panels_with_drift_and_six_without(results: dict[str, Any]) -> None:
    assert analysis.panel_count(results) == 10 and analysis.extra_panels(results) == 1  # the step loss
    results = dict(results, step_history=[])  # the per-step panels are tested below
    assert analysis.panel_count(results) == 10
    assert analysis.panel_count(without_drift(results)) == 6
    full = analysis.dashboard_figure(results)
    titled = [ax for ax in full.axes if ax.get_title()]  # the throughput panel's twin axis has no title
    assert len(titled) == 10 and all(ax.get_xlabel() == "epoch" and ax.get_ylabel() for ax in titled)
    assert len([ax for ax in analysis.dashboard_figure(without_drift(results)).axes if ax.get_title()]) == 6


def test_step_curves_and_each_task_metric_get_a_panel_and_steps_export_to_csv(
    results: dict[str, Any], tmp_path
) -> None:
    history = [dict(row, **{"train/accuracy": 0.5 + row["epoch"] / 10, "val/accuracy": 0.6}) for row in
               results["metrics_history"]]  # fmt: skip
    steps = [{"step": s, "epoch": 1, "train/loss": 3.0 - s / 10, "train/accuracy": s / 20, "learning_rate": 1e-3,
              "grad_norm": 1.0, "time": 1.0} for s in (5, 10)]  # fmt: skip
    task_results = dict(results, metrics_history=history, step_history=steps)
    assert analysis.extra_panels(task_results) == 2 + 1  # step loss, step accuracy, accuracy per epoch
    titles = {ax.get_title(): ax for ax in analysis.dashboard_figure(task_results).axes if ax.get_title()}
    assert {"Per step · train/loss", "Per step · train/accuracy", "Task metric · accuracy"} <= set(titles)
    assert titles["Per step · train/loss"].get_xlabel() == "step"
    assert len(titles["Task metric · accuracy"].get_lines()) == 2  # train and validation
    path, rows = analysis.export_steps_csv(task_results, tmp_path / "s.csv")
    table = pd.read_csv(path)
    assert rows == 2 and list(table.columns[:3]) == ["step", "epoch", "train/loss"] and "train/accuracy" in table
    assert analysis.export_steps_csv(dict(results, step_history=[])) is None


def test_save_dashboard_writes_a_png_in_results_creating_the_folder(results: dict[str, Any]) -> None:
    path = analysis.save_dashboard(results)
    assert path == Path(results["workspace_root"]) / "results" / "r_dashboard.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert width > 1000 and height > 800
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_save_dashboard_to_a_chosen_path(results: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "figure.png"
    assert analysis.save_dashboard(results, target) == target and target.read_bytes()[:8] == PNG_MAGIC


def test_nothing_to_plot_or_export_without_a_completed_epoch(results: dict[str, Any]) -> None:
    empty = dict(results, metrics_history=[], drift_history=[])
    with pytest.raises(analysis.NothingToAnalyse, match="no completed epoch"):
        analysis.save_dashboard(empty)
    with pytest.raises(analysis.NothingToAnalyse, match="no completed epoch"):
        analysis.export_metrics_csv(empty)


def test_export_writes_every_metric_of_every_epoch(results: dict[str, Any]) -> None:
    path, rows = analysis.export_metrics_csv(results)
    assert path == Path(results["workspace_root"]) / "results" / "r_metrics.csv" and rows == 2
    frame = pd.read_csv(path)
    for row, saved in zip(results["metrics_history"], frame.to_dict("records"), strict=True):
        assert set(saved) == set(row)
        assert all(saved[k] == pytest.approx(v, rel=1e-12) for k, v in row.items())


def test_load_task_model_returns_the_saved_weights(results: dict[str, Any]) -> None:
    model, _ = analysis.load_task_model(results["best_checkpoint_path"])
    saved = read_model_file(Path(results["best_checkpoint_path"]) / "model.safetensors")
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_load_task_model_refuses_a_tampered_checkpoint(results: dict[str, Any]) -> None:
    weights = Path(results["best_checkpoint_path"]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="model.safetensors"):
        analysis.load_task_model(results["best_checkpoint_path"])


def test_the_byte_lm_sample_continues_the_prompt_reproducibly(results: dict[str, Any]) -> None:
    model, task = analysis.load_task_model(results["best_checkpoint_path"])
    first = task.sample_fn(model, "class ", max_new_tokens=30, seed=1)
    assert first == task.sample_fn(model, "class ", max_new_tokens=30, seed=1) and first
    assert len(first.encode("utf-8", errors="surrogateescape")) >= 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.training", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_dashboard_and_export_after_three_epochs_leave_a_png_and_a_three_row_csv(
    make_config, tmp_path: Path
) -> None:
    from utils.training.engine.trainer import Trainer

    workspace = tmp_path / "W"
    Trainer(make_config(workspace, run_name="cli", epochs=3), resume="never", progress=False).fit()
    dashboard = run_cli("dashboard", "--checkpoint-dir", str(workspace), "--json")
    export = run_cli("export", "--checkpoint-dir", str(workspace))
    assert dashboard.returncode == 0 and export.returncode == 0, dashboard.stderr + export.stderr
    png = workspace / "results" / "cli_dashboard.png"
    assert json.loads(dashboard.stdout) == {"dashboard": str(png)} and png.read_bytes()[:8] == PNG_MAGIC
    assert list(pd.read_csv(workspace / "results" / "cli_metrics.csv")["epoch"]) == [1, 2, 3]
    assert "3 row(s) written to" in export.stdout


def test_cli_export_of_an_empty_folder_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = run_cli("export", "--checkpoint-dir", str(tmp_path / "empty"))
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no complete checkpoint" in done.stderr
