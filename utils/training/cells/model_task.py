"""The Model cell: `build_task`, the function `config -> Task` the Training cell trains, and how it is passed on.

(The module is `model_task`, not `model`, so that importing it never shadows the namespace's `model`.)

The notebook's default is the byte-level language model's builder,
`utils.training.engine.lm_task:build_task`; a user replaces it in the cell with a builder of their own
(`Task(model=..., train_data=..., val_data=..., loss_fn=...)`). The Training cell passes the builder
to the trainer with the path the run records: the byte LM's import path for the default (so the
command line can resume the run too), `notebook:build_task` for one defined in the notebook.
"""

from __future__ import annotations

from typing import Any

from ._namespace import text_output

DEFAULT_TASK_PATH = "utils.training.engine.lm_task:build_task"
NOTEBOOK_TASK_PATH = "notebook:build_task"
SKIPPED_NOTE = "model_cell_skipped_said"  # the "Model cell not run" note is printed once per kernel


def is_default(builder: Any) -> bool:
    return getattr(builder, "__module__", None) == "utils.training.engine.lm_task" and (
        getattr(builder, "__name__", None) == "build_task"
    )


def task_arguments(ns: dict[str, Any]) -> dict[str, Any]:
    """The keywords the Training cell gives the trainer: `build_task` and the `task_path` the run records.
    Without a Model cell run, nothing (the trainer's default, the byte LM), said once per kernel."""
    if "build_task" not in ns:
        if not ns.get(SKIPPED_NOTE):
            print("Model cell not run: training the default task (the byte-level language model).")
            ns[SKIPPED_NOTE] = True
        return {}
    builder = ns["build_task"]
    if not callable(builder):
        raise TypeError(f"build_task is a {type(builder).__name__}, not a function config -> Task")
    return {"build_task": builder, "task_path": DEFAULT_TASK_PATH if is_default(builder) else NOTEBOOK_TASK_PATH}


@text_output
def run(ns: dict[str, Any]) -> None:
    """Say which task the Training cell will train."""
    builder = ns.get("build_task")
    if is_default(builder):
        print("Task: the byte-level language model on the Python standard library's source (the default).")
    elif callable(builder):
        print(f"Task: your builder {getattr(builder, '__name__', type(builder).__name__)}(config), recorded in the "
              f"run as {NOTEBOOK_TASK_PATH}.")  # fmt: skip
    else:
        print(f"❌ build_task is a {type(builder).__name__}, not a function config -> Task.")
        print("   Next: define build_task as a function (see the comment in this cell) and re-run it.")
        return
    print("Next: the Training cell.")
