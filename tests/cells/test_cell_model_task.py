"""The Model cell: `build_task`, and what the Training cell passes to the trainer for it."""

from __future__ import annotations

from typing import Any

from utils.training.cells import model_task, training
from utils.training.engine.lm_task import build_task as byte_lm_builder


def test_skipping_the_model_cell_trains_the_default_and_says_so_once(capsys) -> None:
    ns: dict[str, Any] = {}
    assert model_task.task_arguments(ns) == {} and model_task.task_arguments(ns) == {}
    assert capsys.readouterr().out.count("Model cell not run: training the default task") == 1


def test_the_cell_defines_build_task_and_names_the_task(capsys) -> None:
    ns: dict[str, Any] = {"build_task": byte_lm_builder}
    model_task.run(ns)
    assert "the byte-level language model" in capsys.readouterr().out
    ns["build_task"] = lambda config: None
    model_task.run(ns)
    assert "recorded in the run as notebook:build_task" in capsys.readouterr().out


def test_a_build_task_that_is_not_a_function_is_reported_before_training(make_config, tmp_path, capsys) -> None:
    ns: dict[str, Any] = {"build_task": 42, "planned_config": make_config(tmp_path), "run_action": "parameters"}
    training.run(ns, progress=False)
    out = capsys.readouterr().out
    assert "❌ build_task is a int, not a function config -> Task" in out and "Model cell" in out
    assert "results" not in ns and not (tmp_path / "checkpoints").exists()


def test_the_builder_goes_to_the_trainer_with_the_path_the_run_records() -> None:
    default = byte_lm_builder
    assert model_task.task_arguments({"build_task": default}) == {
        "build_task": default, "task_path": model_task.DEFAULT_TASK_PATH,
    }  # fmt: skip
    mine = lambda config: default(config)  # noqa: E731
    assert model_task.task_arguments({"build_task": mine}) == {"build_task": mine, "task_path": "notebook:build_task"}
