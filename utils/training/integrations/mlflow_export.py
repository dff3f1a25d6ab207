"""MLflow export: one run's params, per-epoch and per-step metrics and checkpoint paths, logged idempotently.

`python -m utils.training export --mlflow [URI]` (default `sqlite:///<workspace>/mlflow.db`).
The MLflow run is found again by its `training_survives.run_id` and `training_survives.run_dir`
tags, and a metric already logged at a step is never logged twice, so exporting again (after
more training, or by mistake) adds only what is new. Epoch metrics keep their names
(`train/loss`, `val/loss`, ...), step metrics are prefixed `step/`; both are plotted against
the global step. MLflow's telemetry is turned off: nothing leaves the machine.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

EXPERIMENT_NAME = "training-survives"
TAG_RUN_ID = "training_survives.run_id"
TAG_RUN_DIR = "training_survives.run_dir"
TAG_PREFIX = "training_survives."
MAX_BATCH_METRICS = 1000  # MLflow's limit per log_batch call
MAX_BATCH_PARAMS = 100
MAX_PARAM_CHARS = 6000
_NOT_METRICS = {"epoch", "step", "time"}


class MlflowUnavailable(ImportError):
    """MLflow is not installed; `fix` says how to install it."""

    def __init__(self) -> None:
        self.fix = "pip install 'training-survives[mlflow]' (mlflow-skinny with SQLAlchemy and Alembic)"
        super().__init__(f"MLflow export needs MLflow: {self.fix}")


def default_tracking_uri(workspace_root: str | os.PathLike) -> str:
    """`sqlite:///<workspace>/mlflow.db`, an absolute path."""
    return f"sqlite:///{Path(workspace_root).resolve() / 'mlflow.db'}"


def _client(tracking_uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "creating tables" chatter on the console
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise MlflowUnavailable() from exc
    return MlflowClient(tracking_uri=tracking_uri)


def _identity(results: dict[str, Any]) -> dict[str, str]:
    run_dir = str(Path(results.get("run_dir") or results["workspace_root"]).resolve())
    run_id = results.get("run_id")
    return {TAG_RUN_ID: str(run_id) if run_id is not None else "none", TAG_RUN_DIR: run_dir}


def _experiment_id(client: Any, tracking_uri: str, workspace_root: str) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    local = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
    artifacts = (Path(workspace_root).resolve() / "mlartifacts").as_uri() if local else None
    return client.create_experiment(EXPERIMENT_NAME, artifact_location=artifacts)


def _find_run(client: Any, experiment_id: str, identity: dict[str, str]) -> Any | None:
    page_token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=page_token)
        for run in page:
            if all(run.data.tags.get(k) == v for k, v in identity.items()):
                return run
        page_token = page.token
        if not page_token:
            return None


def _params(config: dict[str, Any]) -> dict[str, str]:
    flat = {}
    for key, value in sorted(config.items()):
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        flat[str(key)] = text[:MAX_PARAM_CHARS]
    return flat


def _metric_points(results: dict[str, Any]) -> list[tuple[str, float, int, int]]:
    """(key, value, step, timestamp ms) for every finite metric of the epoch and step rows."""
    now_ms = int(time.time() * 1000)
    points = []
    for rows, prefix in ((results.get("metrics_history") or [], ""), (results.get("step_history") or [], "step/")):
        for row in rows:
            step = row.get("step") if isinstance(row.get("step"), int) else row.get("epoch")
            if not isinstance(step, int):
                continue
            stamp = int(row["time"] * 1000) if isinstance(row.get("time"), (int, float)) else now_ms
            for key, value in row.items():
                if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    points.append((prefix + key, float(value), step, stamp))
    return points


def export_run(results: dict[str, Any], tracking_uri: str | None = None) -> dict[str, Any]:
    """Log one results dict (ours, or a Hugging Face / Lightning run's) to MLflow. Returns
    {"tracking_uri", "experiment_id", "mlflow_run_id", "created", "metrics_logged", "metrics_already_there"}."""
    uri = tracking_uri or default_tracking_uri(results["workspace_root"])
    client = _client(uri)  # first: it sets MLflow's environment before MLflow is imported
    from mlflow.entities import Metric, Param

    experiment_id = _experiment_id(client, uri, results["workspace_root"])
    identity = _identity(results)
    run = _find_run(client, experiment_id, identity)
    created = run is None
    if run is None:
        run = client.create_run(experiment_id, run_name=results.get("run_name"), tags=identity)
    run_id = run.info.run_id

    params = {k: v for k, v in _params(results.get("config") or {}).items() if k not in run.data.params}
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MAX_BATCH_PARAMS):
        client.log_batch(run_id, params=items[start : start + MAX_BATCH_PARAMS])

    logged: dict[str, set[int]] = {key: {m.step for m in client.get_metric_history(run_id, key)}
                                   for key in run.data.metrics}  # fmt: skip
    new = [Metric(k, v, ts, s) for k, v, s, ts in _metric_points(results) if s not in logged.get(k, set())]
    already = len(_metric_points(results)) - len(new)
    for start in range(0, len(new), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=new[start : start + MAX_BATCH_METRICS])

    tags = {
        TAG_PREFIX + "source": str(results.get("source", "training-survives")),
        TAG_PREFIX + "checkpoint": str(results.get("checkpoint_path")),
        TAG_PREFIX + "best_checkpoint": str(results.get("best_checkpoint_path")),
        TAG_PREFIX + "step": str(results.get("step")),
    }
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if results.get("completed"):
        client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": uri, "experiment_id": experiment_id, "mlflow_run_id": run_id, "created": created,
            "metrics_logged": len(new), "metrics_already_there": already}  # fmt: skip
