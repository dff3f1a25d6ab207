"""Tests for recovery: the four entry points, broken checkpoints, several runs, search order, metadata only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from utils.training.config import TrainingConfig
from utils.training.engine.checkpoint import MODEL_FILE, STATE_FILE, TRAINER_FILE, CheckpointManager, NoCheckpointFound
from utils.training.engine.commit import MANIFEST_NAME, CheckpointCorrupt, verify
from utils.training.engine.recovery import DEFAULT_SEARCH_DIRS, build_results, read_metrics_log, recover

# The results dict of DESIGN.md (contract).
RESULT_KEYS = {
    "run_name", "run_id", "workspace_root", "checkpoint_dir", "checkpoint_path", "best_checkpoint_path", "config",
    "metrics_history", "best_epoch", "drift_history", "recovered", "skipped",
}  # fmt: skip
METRIC_COLUMNS = {"epoch", "step", "train/loss", "val/loss", "val/perplexity", "train/perplexity", "learning_rate"}


def _run(workspace: Path, name: str = "r") -> Path:
    return Path(workspace) / "checkpoints" / name


def _ckpt(workspace: Path, step: int, name: str = "r") -> Path:
    return _run(workspace, name) / f"step-{step:06d}"


@pytest.fixture
def shared(trained_workspace: dict[str, Any]) -> Path:
    """The session's trained workspace, read-only here (recovery never writes)."""
    return trained_workspace["workspace"]


def test_every_key_of_the_results_dict_is_present_and_json_serialisable(shared: Path):
    results = recover(shared, search_dirs=[])
    assert set(results) >= RESULT_KEYS
    json.dumps(results, allow_nan=True)
    assert results["recovered"] is True
    assert results["run_name"] == "r"
    assert isinstance(results["run_id"], int)
    assert results["workspace_root"] == str(shared)
    assert results["checkpoint_dir"] == str(shared / "checkpoints")
    assert results["checkpoint_path"] == str(_ckpt(shared, 10))
    assert results["skipped"] == []
    config = TrainingConfig.from_dict(results["config"])  # a plain dict a config rebuilds from
    assert config.run_name == "r" and config.steps_per_epoch == 5


@pytest.mark.parametrize("entry", ["workspace", "checkpoints", "run", "step"])
def test_each_of_the_four_entry_points(shared: Path, entry: str):
    given = {
        "workspace": shared,
        "checkpoints": shared / "checkpoints",
        "run": _run(shared),
        "step": _ckpt(shared, 5),
    }[entry]
    results = recover(given, search_dirs=[])
    expected_step = 5 if entry == "step" else 10
    assert results["checkpoint_path"] == str(_ckpt(shared, expected_step))
    assert results["run_name"] == "r"
    assert results["workspace_root"] == str(shared)
    assert [row["epoch"] for row in results["metrics_history"]] == list(range(1, expected_step // 5 + 1))
    assert results["searched"] == [str(given)]


def test_recovery_and_training_return_the_same_dict(trained_workspace: dict[str, Any]):
    trained = trained_workspace["results"]
    recovered = recover(trained_workspace["workspace"], search_dirs=[])
    for key in RESULT_KEYS - {"recovered", "skipped"}:
        assert recovered[key] == trained[key], key
    assert trained["recovered"] is False


def test_metrics_history_has_one_row_per_completed_epoch(shared: Path):
    for step, epochs in [(3, []), (5, [1]), (6, [1]), (9, [1]), (10, [1, 2])]:
        history = recover(_ckpt(shared, step), search_dirs=[])["metrics_history"]
        assert [row["epoch"] for row in history] == epochs, step
        for row in history:
            assert set(row) >= METRIC_COLUMNS
            assert row["step"] == row["epoch"] * 5
    drift = recover(shared, search_dirs=[])["drift_history"]
    assert [d["epoch"] for d in drift] == [1, 2]
    assert all("drift/token_js" in d for d in drift)


def test_best_checkpoint_and_best_epoch_agree(shared: Path):
    results = recover(shared, search_dirs=[])
    rows = results["metrics_history"]
    best_row = min(rows, key=lambda r: r["val/loss"])
    assert results["best_epoch"] == best_row["epoch"]
    assert results["best_checkpoint_path"] == str(_ckpt(shared, best_row["step"]))
    verify(Path(results["best_checkpoint_path"]))


def test_a_broken_newest_checkpoint_is_passed_over_and_listed(workspace_copy: Path):
    newest = _ckpt(workspace_copy, 10)
    weights = newest / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated copy
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"] == str(_ckpt(workspace_copy, 9))
    assert results["skipped"] == [{"path": str(newest), "reason": results["skipped"][0]["reason"]}]
    assert "truncated" in results["skipped"][0]["reason"]
    assert [row["epoch"] for row in results["metrics_history"]] == [1]  # step 9 finished one epoch


@pytest.mark.parametrize(
    "damage",
    ["no manifest", "torn manifest", "manifest not json", "missing file", "trainer state not an object"],
)
def test_each_kind_of_broken_newest_is_skipped_with_a_reason(workspace_copy: Path, damage: str):
    newest = _ckpt(workspace_copy, 10)
    manifest = newest / MANIFEST_NAME
    if damage == "no manifest":
        manifest.unlink()
    elif damage == "torn manifest":
        manifest.write_bytes(manifest.read_bytes()[:40])
    elif damage == "manifest not json":
        manifest.write_bytes(b"\x00" * manifest.stat().st_size)
    elif damage == "missing file":
        (newest / STATE_FILE).unlink()
    else:  # valid JSON of the recorded size, but not an object
        size = (newest / TRAINER_FILE).stat().st_size
        (newest / TRAINER_FILE).write_text("[" + " " * (size - 2) + "]")
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"] == str(_ckpt(workspace_copy, 9))
    assert [s["path"] for s in results["skipped"]] == [str(newest)]
    assert results["skipped"][0]["reason"]


def test_leftover_temp_folders_are_listed_never_taken(workspace_copy: Path):
    leftover = _run(workspace_copy) / ".tmp-step-000011-123-abcd"
    shutil.copytree(_ckpt(workspace_copy, 10), leftover)  # even a complete-looking one
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"] == str(_ckpt(workspace_copy, 10))
    assert {"path": str(leftover), "reason": results["skipped"][0]["reason"]} in results["skipped"]
    assert "temporary" in results["skipped"][0]["reason"]


def test_a_broken_step_folder_named_directly_is_listed_and_a_valid_one_is_taken(workspace_copy: Path):
    named = _ckpt(workspace_copy, 5)
    (named / MANIFEST_NAME).unlink()
    results = recover(named, search_dirs=[])
    assert results["skipped"][0]["path"] == str(named)
    verify(Path(results["checkpoint_path"]))


def test_a_run_with_no_valid_checkpoint_gives_an_error_naming_each_one(workspace_copy: Path):
    for step in (3, 5, 6, 9, 10):
        (_ckpt(workspace_copy, step) / MANIFEST_NAME).unlink()
    with pytest.raises(NoCheckpointFound) as info:
        recover(workspace_copy, search_dirs=[])
    message = str(info.value)
    assert str(workspace_copy) in message
    assert str(_ckpt(workspace_copy, 10)) in message and "MANIFEST.json is missing" in message


def test_recovery_reads_metadata_only(workspace_copy: Path):
    newest = _ckpt(workspace_copy, 10)
    for name in (MODEL_FILE, STATE_FILE):  # unreadable as weights, but the same size
        path = newest / name
        path.write_bytes(b"\x00" * path.stat().st_size)
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"] == str(newest)
    assert results["skipped"] == []
    with pytest.raises(CheckpointCorrupt):
        verify(newest)  # the full check would have refused it: recover did not read the weights


# -- several runs ------------------------------------------------------------------------------
@pytest.fixture
def two_runs(workspace_copy: Path, make_config) -> Path:
    """The shared run "r" plus a newer one-epoch run "r2" in the same workspace."""
    from utils.training.engine.trainer import Trainer

    old = os.stat(_ckpt(workspace_copy, 10)).st_mtime - 100
    os.utime(_ckpt(workspace_copy, 10), (old, old))
    Trainer(make_config(workspace_copy, run_name="r2", epochs=1, steps_per_epoch=2), progress=False).fit()
    return workspace_copy


def test_the_newest_run_is_taken_and_run_name_selects_another(two_runs: Path):
    assert recover(two_runs, search_dirs=[])["run_name"] == "r2"
    chosen = recover(two_runs, search_dirs=[], run_name="r")
    assert chosen["run_name"] == "r" and chosen["checkpoint_path"] == str(_ckpt(two_runs, 10))
    newer = os.stat(_ckpt(two_runs, 2, "r2")).st_mtime + 100
    os.utime(_ckpt(two_runs, 10), (newer, newer))
    assert recover(two_runs / "checkpoints", search_dirs=[])["run_name"] == "r"


def test_an_unknown_run_name_is_an_error_naming_it(two_runs: Path):
    with pytest.raises(NoCheckpointFound, match="for run 'nope'"):
        recover(two_runs, search_dirs=[], run_name="nope")


def test_a_newest_run_without_a_valid_checkpoint_falls_back_to_another(two_runs: Path):
    broken = _ckpt(two_runs, 2, "r2")
    (broken / MANIFEST_NAME).unlink()
    results = recover(two_runs, search_dirs=[])
    assert results["run_name"] == "r"
    skipped = {s["path"] for s in results["skipped"]}
    assert {str(broken), str(_run(two_runs, "r2"))} <= skipped


# -- search order ------------------------------------------------------------------------------
def test_the_given_folder_comes_before_the_search_dirs(tmp_path: Path, trained_workspace, make_config):
    from utils.training.engine.trainer import Trainer

    other = tmp_path / "other"
    Trainer(make_config(other, run_name="elsewhere", epochs=1, steps_per_epoch=2), progress=False).fit()
    shared = trained_workspace["workspace"]
    # the other workspace's run is newer, but the given folder is searched first
    assert recover(shared, search_dirs=[other])["run_name"] == "r"
    assert recover(other, search_dirs=[shared])["run_name"] == "elsewhere"
    empty = tmp_path / "empty"
    empty.mkdir()
    results = recover(empty, search_dirs=[tmp_path / "missing", shared])
    assert results["run_name"] == "r"
    assert results["searched"] == [str(empty), str(tmp_path / "missing"), str(shared)]
    assert recover(None, search_dirs=[tmp_path / "missing", other])["run_name"] == "elsewhere"


def test_the_default_search_dirs_are_used_without_a_folder(
    tmp_path: Path, trained_workspace, monkeypatch: pytest.MonkeyPatch
):
    if Path(DEFAULT_SEARCH_DIRS[0]).exists():
        pytest.skip(f"{DEFAULT_SEARCH_DIRS[0]} exists on this machine")
    assert DEFAULT_SEARCH_DIRS == (
        "/content/workspace/checkpoints",
        "./training_output/checkpoints",
        "./tmp_training_output/checkpoints",
    )
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_workspace["workspace"], tmp_path / "tmp_training_output")
    results = recover()
    assert results["run_name"] == "r"
    assert Path(results["checkpoint_path"]).resolve() == _ckpt(tmp_path / "tmp_training_output", 10)
    assert results["searched"] == [str(Path(d)) for d in DEFAULT_SEARCH_DIRS]


def test_nothing_found_names_every_place_looked(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    with pytest.raises(NoCheckpointFound) as info:
        recover(tmp_path / "empty", search_dirs=[a_file, tmp_path / "missing"])
    message = str(info.value)
    for place in (tmp_path / "empty", a_file, tmp_path / "missing"):
        assert str(place) in message
    assert "train first" in message


# -- metrics.jsonl and build_results on a hand-made run ----------------------------------------
def test_read_metrics_log_ignores_a_torn_last_line_and_keeps_the_last_row_per_epoch(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 1, "val/loss": 3.0}, {"epoch": 2, "val/loss": 2.0}, {"epoch": 2, "val/loss": 1.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '[1, 2]\n{"epoch": true}\n' + '{"epoch": 3, "val/lo')
    assert read_metrics_log(path) == [{"epoch": 1, "val/loss": 3.0}, {"epoch": 2, "val/loss": 1.5}]
    path.write_bytes(text.encode() + b'\xff\xfe{"epoch": 4}')
    assert [r["epoch"] for r in read_metrics_log(path)] == [1, 2]
    assert read_metrics_log(tmp_path / "missing.jsonl") == []


def test_a_torn_line_in_metrics_jsonl_does_not_disturb_recovery(workspace_copy: Path):
    metrics = _run(workspace_copy) / "metrics.jsonl"
    assert len(read_metrics_log(metrics)) == 2
    with open(metrics, "ab") as f:
        f.write(b'{"epoch": 3, "train/loss": 1.2')
    results = recover(workspace_copy, search_dirs=[])
    assert [row["epoch"] for row in results["metrics_history"]] == [1, 2]


def _hand_made_run(run_dir: Path, trainer_state: dict[str, Any], step: int = 4) -> Path:
    import torch

    with CheckpointManager(
        run_dir, keep_last=0, keep_best=1, monitor_metric="val/loss", monitor_mode="min", async_save=False
    ) as manager:
        manager.save(
            step,
            model_state={"w": torch.zeros(3)},
            training_state={"data": {"position": step, "seed": 0}},
            trainer_state=trainer_state,
        )
    return run_dir / f"step-{step:06d}"


def test_metrics_jsonl_fills_in_for_a_checkpoint_without_history_up_to_its_epoch(tmp_path: Path):
    run_dir = tmp_path / "ws" / "checkpoints" / "old"
    _hand_made_run(run_dir, {"run_name": "old", "run_id": 3, "step": 4, "epoch": 2, "config": {}})
    rows = [{"epoch": e, "step": 2 * e, "val/loss": 5.0 - e} for e in (1, 2, 3)]  # epoch 3 outran the checkpoint
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "va')
    results = build_results(run_dir, recovered=True)
    assert [r["epoch"] for r in results["metrics_history"]] == [1, 2]
    assert results["run_id"] == 3 and results["drift_history"] == []


def test_best_epoch_follows_the_monitored_metric_and_mode(tmp_path: Path):
    history = [
        {"epoch": 1, "val/loss": 1.0, "train/loss": 3.0, "val/accuracy": 0.2},
        {"epoch": 2, "val/loss": 2.0, "train/loss": 1.0, "val/accuracy": 0.9},
        {"epoch": 3, "val/loss": 3.0, "train/loss": 2.0, "val/accuracy": 0.5},
    ]
    for metric, mode, expected in [("val/loss", "min", 1), ("train/loss", "min", 2), ("val/accuracy", "max", 2)]:
        run_dir = tmp_path / metric.replace("/", "_") / "checkpoints" / "r"
        state = {
            "run_name": "r", "step": 4, "epoch": 3, "metrics_history": history,
            "config": {"monitor_metric": metric, "monitor_mode": mode},
        }  # fmt: skip
        _hand_made_run(run_dir, state)
        assert build_results(run_dir, recovered=True)["best_epoch"] == expected, metric


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", ""])
def test_a_damaged_run_json_does_not_stop_recovery(workspace_copy: Path, content: str):
    (_run(workspace_copy) / "run.json").write_text(content)
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"] == str(_ckpt(workspace_copy, 10))
    assert isinstance(results["run_id"], int) and results["config"]["run_name"] == "r"
