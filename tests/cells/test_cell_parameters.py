"""The Parameters cell: form values, TRAINING_* overrides, the workspace they resolve to, bad values."""

from __future__ import annotations

from pathlib import Path

from utils.training.cells import parameters
from utils.training.config import TrainingConfig


def test_defaults_outside_colab_plan_a_tiny_run_in_the_local_workspace_that_resumes(capsys) -> None:
    ns: dict = {}
    parameters.run(ns)
    config = ns["planned_config"]
    assert isinstance(config, TrainingConfig)
    assert (config.run_name, config.preset, config.epochs) == ("notebook_run", "tiny", 2)
    assert config.workspace_root == "training_output" and ns["scratch_workspace"] is False
    out = capsys.readouterr().out
    assert "resumes where it stopped" in out and "clears" not in out


def test_a_fresh_start_is_opt_in_and_only_for_the_scratch_folder(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("TRAINING_FRESH_START", "1")
    ns: dict = {}
    parameters.run(ns)  # the default workspace is never cleared, even when asked
    assert ns["scratch_workspace"] is False
    monkeypatch.setenv("TRAINING_WORKSPACE", str(tmp_path / "chosen"))
    parameters.run(ns)  # nor a workspace a person chose
    assert ns["scratch_workspace"] is False
    monkeypatch.setenv("TRAINING_WORKSPACE", "tmp_training_output")
    parameters.run(ns)
    assert ns["scratch_workspace"] is True
    assert "TRAINING_FRESH_START=1: the Training cell clears it" in capsys.readouterr().out
    monkeypatch.delenv("TRAINING_FRESH_START")
    parameters.run(ns)
    assert ns["scratch_workspace"] is False


def test_overrides_win_over_the_form_and_are_named(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("TRAINING_EPOCHS", "3")
    monkeypatch.setenv("TRAINING_PRESET", "small")
    monkeypatch.setenv("TRAINING_WORKSPACE", str(tmp_path / "w"))
    ns: dict = {}
    parameters.run(ns, run_name="mine", preset="tiny", epochs=1, workspace="ignored")
    config = ns["planned_config"]
    assert (config.run_name, config.preset, config.epochs) == ("mine", "small", 3)
    assert config.n_layer == 4  # the small preset's sizes, not tiny's
    assert config.workspace_root == str(tmp_path / "w") and ns["scratch_workspace"] is False
    out = capsys.readouterr().out
    assert "epochs=3 (from TRAINING_EPOCHS)" in out and "from TRAINING_WORKSPACE" in out


def test_empty_overrides_count_as_unset(monkeypatch) -> None:
    for name in ("TRAINING_EPOCHS", "TRAINING_PRESET", "TRAINING_WORKSPACE"):
        monkeypatch.setenv(name, "")
    ns: dict = {}
    parameters.run(ns, epochs=4, workspace="chosen")
    assert ns["planned_config"].epochs == 4 and ns["planned_config"].workspace_root == "chosen"
    assert ns["scratch_workspace"] is False


def test_a_bad_value_is_reported_and_leaves_no_stale_plan(monkeypatch, capsys) -> None:
    ns: dict = {"planned_config": TrainingConfig()}
    monkeypatch.setenv("TRAINING_EPOCHS", "three")
    parameters.run(ns)
    out = capsys.readouterr().out
    assert "epochs='three' is not a whole number" in out and "re-run this cell" in out
    assert "planned_config" not in ns


def test_an_unknown_preset_and_a_bad_run_name_are_reported(capsys) -> None:
    ns: dict = {}
    parameters.run(ns, preset="huge")
    parameters.run(ns, run_name="no spaces allowed")
    out = capsys.readouterr().out
    assert "preset='huge' is not one of ['base', 'small', 'tiny']" in out
    assert "run_name='no spaces allowed' is invalid" in out
    assert "planned_config" not in ns


def test_in_colab_the_workspace_is_drive_when_mounted_else_content() -> None:
    ns = {"IN_COLAB": True, "drive_workspace": "/content/drive/MyDrive/training_workspace"}
    parameters.run(ns)
    assert ns["planned_config"].workspace_root == "/content/drive/MyDrive/training_workspace"
    ns = {"IN_COLAB": True, "drive_workspace": None}
    parameters.run(ns)
    assert ns["planned_config"].workspace_root == "/content/workspace" and ns["scratch_workspace"] is False


def test_the_tensorboard_box_turns_on_tensorboard_logging_and_says_where(tmp_path: Path, capsys) -> None:
    ns: dict = {}
    parameters.run(ns, workspace=str(tmp_path / "ws"))
    assert ns["planned_config"].tensorboard is False and "TensorBoard" not in capsys.readouterr().out
    parameters.run(ns, workspace=str(tmp_path / "ws"), tensorboard=True)
    assert ns["planned_config"].tensorboard is True
    out = capsys.readouterr().out
    assert "TensorBoard: events in" in out and str(tmp_path / "ws" / "tensorboard") in out and "--logdir" in out
