"""MLflow export: a real local store read back with MlflowClient; exporting twice duplicates nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient  # noqa: E402

from utils.training.engine.recovery import recover  # noqa: E402
from utils.training.integrations.mlflow_export import (  # noqa: E402
    EXPERIMENT_NAME,
    TAG_RUN_ID,
    default_tracking_uri,
    export_run,
)

REPO = Path(__file__).resolve().parents[2]


def _only_run(uri: str):  # noqa: ANN202
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_export_to_the_default_sqlite_store_twice(workspace_copy: Path) -> None:
    command = [sys.executable, "-m", "utils.training", "export", "--checkpoint-dir", str(workspace_copy), "--mlflow",
               "--json"]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    first = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO), timeout=180, env=env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["tracking_uri"] == default_tracking_uri(workspace_copy) and report["created"] is True
    assert (workspace_copy / "mlflow.db").is_file()

    results = recover(workspace_copy, search_dirs=[])
    assert results["source"] == "training-survives"
    client, run = _only_run(report["tracking_uri"])
    assert run.info.run_id == report["mlflow_run_id"] and run.info.run_name == results["run_name"]
    assert run.data.tags[TAG_RUN_ID] == str(results["run_id"])
    assert run.data.tags["training_survives.best_checkpoint"] == results["best_checkpoint_path"]
    assert run.data.params["run_name"] == results["run_name"] and run.data.params["epochs"] == "2"
    expected = sorted((r["step"], r["val/loss"]) for r in results["metrics_history"])
    assert _history(client, run.info.run_id, "val/loss") == expected
    for row in results.get("step_history") or []:  # step rows, where the run has them
        assert (row["step"], row["train/loss"]) in _history(client, run.info.run_id, "step/train/loss")

    again = export_run(results)  # the same export again (in-process: the CLI path is the one above)
    assert again["mlflow_run_id"] == report["mlflow_run_id"] and again["created"] is False
    assert again["metrics_logged"] == 0 and again["metrics_already_there"] == report["metrics_logged"]
    client, run = _only_run(report["tracking_uri"])
    assert _history(client, run.info.run_id, "val/loss") == expected


def test_hf_run_export_adds_only_what_is_new(hf_run: dict[str, Path], tmp_path: Path) -> None:
    results = recover(hf_run["output_dir"], search_dirs=[])
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    partial = {**results, "metrics_history": results["metrics_history"][:1],
               "step_history": results["step_history"][:6]}  # fmt: skip
    first = export_run(partial, uri)
    second = export_run(results, uri)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["metrics_already_there"] == first["metrics_logged"] > 0
    client, run = _only_run(uri)
    assert run.data.tags["training_survives.source"] == "huggingface"
    assert _history(client, run.info.run_id, "step/train/loss") == [
        (r["step"], r["train/loss"]) for r in results["step_history"]
    ]
    assert [s for s, _ in _history(client, run.info.run_id, "val/loss")] == [6, 12]
    assert export_run(results, uri)["metrics_logged"] == 0
