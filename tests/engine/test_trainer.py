"""Tests for the Trainer: bit-identical resume, resume refusals, the results dict, ExperimentDB logging."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from utils.training.engine.checkpoint import MODEL_FILE, STATE_FILE, list_checkpoints, read_training_state
from utils.training.engine.experiment_db import ExperimentDB
from utils.training.engine.recovery import read_metrics_log
from utils.training.engine.rollback import ResumeRefused
from utils.training.engine.trainer import ResumeError, Trainer

RESULT_KEYS = {
    "run_name", "run_id", "workspace_root", "checkpoint_dir", "checkpoint_path", "best_checkpoint_path", "config",
    "metrics_history", "best_epoch", "drift_history", "recovered", "skipped",
}  # fmt: skip
METRIC_KEYS = {
    "epoch", "step", "train/loss", "val/loss", "val/perplexity", "train/perplexity", "learning_rate", "grad_norm",
    "epoch_seconds", "tokens_per_second",
}  # fmt: skip
WALL_CLOCK_KEYS = {
    "epoch_seconds",
    "tokens_per_second",
    "samples_per_second",
    "time",
}  # the only metrics allowed to differ


def _run_dir(workspace: Path) -> Path:
    return Path(workspace) / "checkpoints" / "r"


def _deterministic(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS} for row in rows]


def _assert_same_final_state(reference: Path, resumed: Path) -> None:
    ref_weights, new_weights = load_file(str(reference / MODEL_FILE)), load_file(str(resumed / MODEL_FILE))
    assert ref_weights.keys() == new_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], new_weights[name]), f"weight {name} differs"
    ref_state = read_training_state(reference / STATE_FILE)
    new_state = read_training_state(resumed / STATE_FILE)
    for index, slots in ref_state["optimizer"]["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, new_state["optimizer"]["state"][index][key]), f"optimizer {index}/{key}"
    assert ref_state["data"] == new_state["data"]
    assert torch.equal(ref_state["rng"]["torch"], new_state["rng"]["torch"])


def _crash_after(workspace: Path, step: int) -> None:
    """What a runtime that died right after the checkpoint of `step` leaves: no later checkpoint."""
    for found, path in list_checkpoints(_run_dir(workspace)):
        if found > step:
            shutil.rmtree(path)


@pytest.mark.parametrize(("crash_step", "kind"), [(5, "epoch end"), (3, "mid-epoch 1"), (9, "mid-epoch 2")])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
    trained_workspace: dict[str, Any], workspace_copy: Path, crash_step: int, kind: str
):
    reference = trained_workspace["results"]
    _crash_after(workspace_copy, crash_step)
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    trainer = Trainer(config, resume="auto", progress=False)
    results = trainer.fit()

    assert results["status"] == "completed"
    assert results["resume_count"] == 1
    assert any(f"step-{crash_step:06d}" in m for m in results["messages"])  # it said where it resumed from
    final = _run_dir(workspace_copy) / "step-000010"
    assert results["checkpoint_path"] == str(final)
    _assert_same_final_state(_run_dir(trained_workspace["workspace"]) / "step-000010", final)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, load_file(str(final / MODEL_FILE)).get(name, value)), name
    assert _deterministic(results["metrics_history"]) == _deterministic(reference["metrics_history"])
    assert results["drift_history"] == reference["drift_history"]
    assert results["best_epoch"] == reference["best_epoch"]
    # metrics.jsonl again holds exactly one row per epoch
    logged = read_metrics_log(_run_dir(workspace_copy) / "metrics.jsonl")
    assert _deterministic(logged) == _deterministic(reference["metrics_history"])
    lines = (_run_dir(workspace_copy) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_resume_from_a_named_checkpoint_folder(trained_workspace: dict[str, Any], workspace_copy: Path):
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    named = _run_dir(workspace_copy) / "step-000006"
    results = Trainer(config, resume=str(named), progress=False).fit()
    assert results["resume_count"] == 1
    _assert_same_final_state(
        _run_dir(trained_workspace["workspace"]) / "step-000010", _run_dir(workspace_copy) / "step-000010"
    )


def test_resume_never_on_an_existing_run_is_refused_and_touches_nothing(
    trained_workspace: dict[str, Any], workspace_copy: Path
):
    run_dir = _run_dir(workspace_copy)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    with pytest.raises(ResumeRefused) as info:  # the engine words the choices; the CLI turns them into flags
        Trainer(config, resume="never", progress=False).fit()
    message = str(info.value)
    assert str(run_dir) in message and "resume=auto" in message and "new run name" in message
    assert info.value.choices == ["resume_auto", "new_run_name"]
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_resume_from_a_missing_path_is_refused_at_once(tmp_path: Path, make_config):
    with pytest.raises(ResumeError, match="no such checkpoint folder"):
        Trainer(make_config(tmp_path), resume=str(tmp_path / "nope"), progress=False)


@pytest.mark.parametrize("release", [False, True], ids=["kept", "released"])
def test_release_snapshot_buffers_reaches_the_checkpoint_manager(tmp_path: Path, make_config, release: bool):
    trainer = Trainer(make_config(tmp_path, release_snapshot_buffers=release), progress=False)
    manager = trainer._manager(tmp_path / "run")
    assert manager.release_buffers is release


def test_resume_with_another_model_size_is_refused(trained_workspace: dict[str, Any], workspace_copy: Path):
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy), n_embd=32)
    with pytest.raises(ResumeError, match="n_embd=64 but the config says 32"):
        Trainer(config, resume="auto", progress=False).fit()


def test_the_results_dict_of_a_finished_run(trained_workspace: dict[str, Any]):
    results = trained_workspace["results"]
    workspace = trained_workspace["workspace"]
    assert set(results) >= RESULT_KEYS
    assert results["recovered"] is False and results["status"] == "completed"
    assert results["run_name"] == "r" and results["workspace_root"] == str(workspace)
    assert results["checkpoint_path"] == str(_run_dir(workspace) / "step-000010")
    assert [row["epoch"] for row in results["metrics_history"]] == [1, 2]
    for row in results["metrics_history"]:
        assert set(row) >= METRIC_KEYS
        assert any(key.startswith("drift/") for key in row)
    assert [d["epoch"] for d in results["drift_history"]] == [1, 2]
    assert results["config"] == trained_workspace["config"].to_dict()
    json.dumps(results, allow_nan=True)
    # keep_last=0 kept every checkpoint: the epoch ends and every third step
    assert sorted(step for step, _ in list_checkpoints(_run_dir(workspace))) == [3, 5, 6, 9, 10]
    run_info = json.loads((_run_dir(workspace) / "run.json").read_text())
    assert run_info["run_id"] == results["run_id"] and run_info["config"]["run_name"] == "r"


def test_experiment_db_has_the_run_completed_with_its_metrics(trained_workspace: dict[str, Any]):
    results = trained_workspace["results"]
    with ExperimentDB(trained_workspace["config"].db_path) as db:
        run = db.get_run(results["run_id"])
        frame = db.metrics_frame(results["run_id"])
    assert run is not None and run["name"] == "r" and run["status"] == "completed"
    assert run["finished_at"] is not None
    assert run["config"]["steps_per_epoch"] == 5
    assert list(frame["epoch"]) == [1, 2] and list(frame["step"]) == [5, 10]
    expected = [row["val/loss"] for row in results["metrics_history"]]
    assert list(frame["val/loss"]) == pytest.approx(expected)


def test_a_resumed_run_keeps_one_db_run_without_duplicate_rows(trained_workspace: dict[str, Any], workspace_copy: Path):
    _crash_after(workspace_copy, 6)
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    results = Trainer(config, progress=False).fit()
    with ExperimentDB(config.db_path) as db:
        runs = db.list_runs()
        frame = db.metrics_frame(results["run_id"])
    assert [r["id"] for r in runs] == [results["run_id"]]
    assert runs[0]["status"] == "completed" and runs[0]["resume_count"] == 1
    assert list(frame["epoch"]) == [1, 2]


def test_a_checkpoint_written_before_the_task_api_resumes_bit_identical(
    trained_workspace: dict[str, Any], workspace_copy: Path
):
    """The byte LM's checkpoints of format 1 (before the Task API) kept the epoch's sums as a mean
    per step and the data position as the stream's own state, and recorded no builder."""
    from utils.training.engine.checkpoint import CheckpointManager, load_checkpoint

    run_dir = _run_dir(workspace_copy)
    loaded = load_checkpoint(run_dir / "step-000003")
    batch_size = trained_workspace["config"].batch_size
    state, sums = dict(loaded.training_state), loaded.training_state["accumulators"]
    state["accumulators"] = {
        "loss_sum": sums["loss"] / batch_size, "grad_norm_sum": sums["grad_norm"],
        "grad_norm_sq_sum": sums["grad_norm_sq"], "token_counts": sums["token_counts"], "steps": sums["steps"],
        "seconds": sums["seconds"],
    }  # fmt: skip
    state["data"] = state["data"]["dataset"]  # {"position", "seed"}
    del state["interval"]
    trainer_state = {k: v for k, v in loaded.trainer_state.items() if k not in ("task", "steps_per_epoch")}
    for _, path in list_checkpoints(run_dir):
        shutil.rmtree(path)
    CheckpointManager(run_dir, keep_last=0, keep_best=1, monitor_metric="val/loss", monitor_mode="min",
                      async_save=False).save(3, model_state=loaded.model_state, training_state=state,
                                             trainer_state=trainer_state, manifest_fields={"epoch": 0})  # fmt: skip
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    results = Trainer(config, progress=False).fit()
    assert results["resume_count"] == 1 and results["task"] == "utils.training.engine.lm_task:build_task"
    reference = _run_dir(trained_workspace["workspace"]) / "step-000010"
    assert all(
        load_file(str(reference / MODEL_FILE))[k].equal(v)
        for k, v in load_file(str(run_dir / "step-000010" / MODEL_FILE)).items()
    )
    assert _deterministic(results["metrics_history"]) == _deterministic(trained_workspace["results"]["metrics_history"])
