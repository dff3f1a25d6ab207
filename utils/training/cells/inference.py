"""The Inference cell: load the best checkpoint's weights safely and run the task's sample function on a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._namespace import check, show_path, text_output
from .best_model import verified_best

SAMPLE_START = "----- sample -----"
SAMPLE_END = "----- end of sample -----"


def _builder_arguments(ns: dict[str, Any]) -> dict[str, Any]:
    """The Model cell's builder and the path runs record for it; nothing when the cell was not run
    (then only the byte LM, or a run whose recorded builder can be imported, loads)."""
    from .model_task import DEFAULT_TASK_PATH, NOTEBOOK_TASK_PATH, is_default

    builder = ns.get("build_task")
    if not callable(builder):
        return {}
    return {"build_task": builder, "task_path": DEFAULT_TASK_PATH if is_default(builder) else NOTEBOOK_TASK_PATH}


@text_output
def run(ns: dict[str, Any], prompt: str = "def ", max_new_tokens: int = 200, seed: int = 0) -> None:
    from ..analysis import load_task_model
    from ..config import ConfigError
    from ..engine.commit import CheckpointCorrupt
    from ..engine.foreign_runs import load_hint
    from ..engine.task import TaskError
    from ..engine.trainer import TaskMismatch

    if not check(ns, ["results"], cell="Inference"):
        return
    results = ns["results"]
    if (hint := load_hint(results)) is not None:  # a Hugging Face or Lightning run: its framework loads it
        print(f"ℹ️ The Inference cell samples only from runs of the Training cell; {hint}.")
        return
    path = ns.get("best_checkpoint_path") or results.get("best_checkpoint_path") or results.get("checkpoint_path")
    if not path:
        print("❌ The results name no checkpoint. Next: run the Recovery cell to read the run from disk.")
        return
    try:
        max_new_tokens = int(max_new_tokens)
        if not 1 <= max_new_tokens <= 10_000:
            raise ValueError
    except (TypeError, ValueError):
        print(f"❌ max_new_tokens={max_new_tokens!r} must be a whole number from 1 to 10000; fix it and re-run.")
        return
    try:
        try:
            model, task = load_task_model(path, **_builder_arguments(ns))
        except CheckpointCorrupt as exc:  # the full check failed: the best checkpoint that passes it
            print(f"⚠️ {show_path(path)} failed its integrity check: {exc.reason}")
            path, _ = verified_best(results, Path(path))
            if path is None:
                return
            model, task = load_task_model(path, **_builder_arguments(ns))
    except TaskMismatch as exc:
        print(f"❌ {show_path(path)} was trained with the task builder {exc.recorded!r}, not {exc.given!r}.")
        print("Next: define that builder as build_task in the Model cell, run it, then re-run this cell.")
        return
    except (CheckpointCorrupt, ConfigError, TaskError, OSError, RuntimeError) as exc:
        print(f"❌ Could not load {show_path(path)}: {exc}")
        print("Next: run the Recovery cell again: it finds the newest checkpoint that is intact.")
        return
    ns["best_model"] = model
    parameters = sum(p.numel() for p in model.parameters())
    print(f"✅ Loaded {parameters:,} parameters from {show_path(path)} (hashes verified, safetensors).")
    if task.sample_fn is None:
        print("⚪ This task has no sample function (Task.sample_fn), so there is nothing to generate from a prompt.")
        print("   The weights are in `best_model`; the Best model cell shows the best epoch's metrics.")
        return
    text = task.sample_fn(model, prompt, max_new_tokens=max_new_tokens, seed=seed)
    print(f"Prompt {prompt!r}, max_new_tokens {max_new_tokens}, seed {seed}:")
    print(SAMPLE_START)
    print(text)
    print(SAMPLE_END)
