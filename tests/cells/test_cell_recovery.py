"""The Recovery cell: nothing on disk, every way to point at a run, damaged checkpoints, the
experiment-database record, recovering twice, and the optional run picker."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from utils.training.cells import _namespace, recovery
from utils.training.config import TrainingConfig
from utils.training.engine.experiment_db import ExperimentDB


def test_nothing_on_disk_is_reported_not_raised(capsys) -> None:
    ns: dict[str, Any] = {}
    recovery.run(ns)
    out = capsys.readouterr().out
    assert "Nothing to recover" in out and "tmp_training_output/checkpoints" in out
    assert "run the Training cell" in out
    assert "results" not in ns


def test_a_missing_folder_is_named_and_nothing_else_is_searched(capsys, tmp_path: Path, workspace_copy: Path) -> None:
    """A given folder is strict (issue 11, problem 1): a run in the default places is not taken instead."""
    import shutil

    shutil.copytree(workspace_copy, Path.cwd() / "training_output")
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(tmp_path / "nope"))
    out = capsys.readouterr().out
    assert f"checkpoint_directory={tmp_path / 'nope'} does not exist" in out and "Recovered" not in out
    assert "results" not in ns


def test_an_empty_folder_finds_nothing(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(tmp_path / "empty"))
    assert "Nothing to recover" in capsys.readouterr().out and "results" not in ns


def test_after_recovery_the_namespace_holds_the_contract(recovered_ns: dict[str, Any], workspace_copy: Path) -> None:
    ns = recovered_ns
    assert all(_namespace.problem(ns, name) is None for name in _namespace.REQUIRED_NAMES)
    assert ns["results"]["recovered"] is True and list(ns["metrics_df"]["epoch"]) == [1, 2]
    assert isinstance(ns["training_config"], TrainingConfig) and ns["config"] is ns["training_config"]
    assert ns["training_config"].checkpoint_dir == workspace_copy / "checkpoints"
    assert ns["drift_data"] == ns["results"]["drift_history"] and len(ns["drift_data"]) == 2
    assert "model" not in ns


def test_the_session_is_recorded_as_a_linked_recovered_run(recovered_ns: dict[str, Any], workspace_copy: Path) -> None:
    with ExperimentDB(workspace_copy / "experiments.db") as db:
        original = db.find_run("r")
        recovered = db.get_run(recovered_ns["run_id"])
    assert recovered["name"] == "r_recovered" and recovered["status"] == "recovered"
    assert recovered["recovered_from"] == original["id"] == recovered_ns["results"]["run_id"]


def test_recovering_twice_reuses_the_recovered_run(recovered_ns: dict[str, Any], workspace_copy: Path, capsys) -> None:
    first_id, first_db = recovered_ns["run_id"], recovered_ns["db"]
    recovery.run(recovered_ns, checkpoint_directory=str(workspace_copy))
    assert "reused run" in capsys.readouterr().out
    assert recovered_ns["run_id"] == first_id
    assert recovered_ns["db"] is not first_db
    with ExperimentDB(workspace_copy / "experiments.db") as db:
        assert [r["name"] for r in db.list_runs()].count("r_recovered") == 1


@pytest.mark.parametrize("where", ["workspace", "checkpoints", "run", "step"])
def test_every_way_to_point_at_a_run_works(where: str, workspace_copy: Path, monkeypatch) -> None:
    target = {
        "workspace": workspace_copy,
        "checkpoints": workspace_copy / "checkpoints",
        "run": workspace_copy / "checkpoints" / "r",
        "step": workspace_copy / "checkpoints" / "r" / "step-000005",
    }[where]
    monkeypatch.setenv("TRAINING_CHECKPOINT_DIR", str(target))
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory="/the/form/value/loses/to/the/variable")
    ns["db"].close()
    assert ns["results"]["step"] == (5 if where == "step" else 10)


def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(workspace_copy: Path, capsys) -> None:
    newest = workspace_copy / "checkpoints" / "r" / "step-000010"
    (newest / "model.safetensors").unlink()
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(workspace_copy))
    ns["db"].close()
    out = capsys.readouterr().out
    assert ns["results"]["step"] == 9
    assert "skipped:    1" in out and "step-000010" in out


def test_a_run_without_its_database_gets_a_new_one_and_no_dangling_link(workspace_copy: Path) -> None:
    (workspace_copy / "experiments.db").unlink()
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(workspace_copy))
    assert ns["db"].get_run(ns["run_id"])["recovered_from"] is None
    ns["db"].close()


def test_the_parameters_workspace_is_searched_before_the_defaults(workspace_copy: Path, capsys) -> None:
    ns: dict[str, Any] = {"planned_config": TrainingConfig(workspace_root=str(workspace_copy))}
    recovery.run(ns)
    ns["db"].close()
    assert "the Parameters cell's workspace" in capsys.readouterr().out


def test_the_picker_lists_the_runs_and_recovers_the_chosen_one(workspace_copy: Path) -> None:
    second = workspace_copy / "checkpoints" / "other"
    shutil.copytree(workspace_copy / "checkpoints" / "r", second)
    ns: dict[str, Any] = {}
    recovery.picker(ns, checkpoint_directory=str(workspace_copy))
    box = ns["run_picker"]
    dropdown, button = box.children[1].children
    assert sorted(Path(value).name for _, value in dropdown.options) == ["other", "r"]
    dropdown.value = str(second)
    button.click()
    assert ns["results"]["run_dir"] == str(second)
    ns["db"].close()


def test_the_picker_shows_nothing_for_a_single_run(workspace_copy: Path) -> None:
    ns: dict[str, Any] = {}
    recovery.picker(ns, checkpoint_directory=str(workspace_copy))
    assert ns["run_picker"] is None


def test_what_a_disconnect_in_the_middle_of_a_save_leaves_is_skipped_with_reasons(workspace_copy: Path, capsys) -> None:
    """The on-disk state a killed save leaves (the engine's SIGKILL tests produce it for real): a
    temporary folder, and a step folder whose manifest was never written."""
    run_dir = workspace_copy / "checkpoints" / "r"
    shutil.copytree(run_dir / "step-000010", run_dir / ".tmp-step-000012-1234")
    shutil.copytree(run_dir / "step-000010", run_dir / "step-000012")
    (run_dir / "step-000012" / "MANIFEST.json").unlink()
    (run_dir / "step-000012" / "model.safetensors").write_bytes(b"\0" * 100)
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(workspace_copy))
    ns["db"].close()
    out = capsys.readouterr().out
    assert ns["results"]["checkpoint_path"] == str(run_dir / "step-000010")
    assert "skipped:    2" in out and "step-000012:" in out and "temporary folder" in out
