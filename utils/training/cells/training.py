"""The Training cell: train the run the latest action chose, resuming it automatically, talking while it trains.

Which run (DESIGN.md, "Which run": the latest action wins): after the Recovery cell, the recovered
run with its own config; after the Parameters cell, the plan; with neither, the Parameters defaults.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainingConfig
from ._live import bars_end_as_text, live_events, print_table
from ._namespace import (
    RUN_ACTION,
    SCRATCH_WORKSPACE,
    TRAINED_RUN,
    close_db,
    notebook_words,
    publish,
    show_path,
    text_output,
)
from .model_task import task_arguments
from .parameters import DEFAULTS, plan


def print_epochs(results: dict[str, Any]) -> None:
    print_table(results.get("metrics_history") or [])


def _recovered_config(ns: dict[str, Any]) -> TrainingConfig | None:
    config, results = ns.get("training_config"), ns.get("results")
    if isinstance(config, TrainingConfig) and isinstance(results, dict):
        return config
    return None


def _chosen_config(ns: dict[str, Any]) -> tuple[TrainingConfig, bool, str] | None:
    """(config, whether to clear the scratch workspace first, resume) from the latest run-choosing action."""
    action = ns.get(RUN_ACTION)
    recovered = _recovered_config(ns)
    if action in ("recovery", "training") and recovered is not None:
        if action == "recovery":
            print(f"Continuing the recovered run '{recovered.run_name}' with its own settings (the Recovery cell "
                  "ran last; re-run the Parameters cell to train its run instead).")  # fmt: skip
        return recovered, False, "auto"
    if isinstance(ns.get("planned_config"), TrainingConfig):
        return ns["planned_config"], bool(ns.get("scratch_workspace")), str(ns.get("planned_resume") or "auto")
    if action == "parameters":
        print("❌ The Parameters cell's last run reported a bad value, so there is no plan to train.")
        print("   Next: fix the value named there, re-run the Parameters cell, then this cell.")
        return None
    print("Parameters cell not run: using its defaults.")
    try:
        p = plan(ns, **DEFAULTS)
    except ConfigError as exc:
        print(f"❌ {exc}.")
        print("   Next: fix the TRAINING_* variable, or run the Parameters cell.")
        return None
    return p.config, p.scratch, p.resume


def _clear_scratch(config: TrainingConfig) -> None:
    root = Path(config.workspace_root)
    # Only ever the scratch folder in the working directory, never a workspace the user chose.
    if root.resolve() == (Path.cwd() / SCRATCH_WORKSPACE).resolve():
        if root.is_dir():
            shutil.rmtree(root)
        print(f"Scratch workspace {show_path(root)}: cleared, so this run starts afresh.")


def _fit(config: TrainingConfig, resume: str, progress: bool, task: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """Train; returns (results, the trained model, the event printer). The progress bar ends as text."""
    from ..engine.trainer import Trainer

    with bars_end_as_text(), live_events(config.epochs, config.run_name) as events:
        trainer = Trainer(config, resume=resume, progress=progress, **task)
        try:
            results = trainer.fit()
        finally:
            runtime = getattr(trainer, "runtime", None)
            if runtime is not None:
                runtime.close()
    return results, getattr(trainer, "model", None), events


def _report(results: dict[str, Any], said: list[str], rows_shown: bool) -> None:
    for message in results.get("messages") or []:
        if message not in said:  # a trainer without live events: its messages, after the fact
            print(f"  {notebook_words(message)}")
    history = results.get("metrics_history") or []
    print(f"{'✅' if results.get('status') == 'completed' else '⚠️'} Run '{results['run_name']}' (run id "
          f"{results.get('run_id')}): {results.get('status')}, {len(history)} epoch(s), step {results.get('step')} "
          f"of {results.get('total_steps')}")  # fmt: skip
    if not rows_shown:
        print_epochs(results)
    print(f"  newest checkpoint: {show_path(results['checkpoint_path'])}")
    print(f"  best checkpoint:   {show_path(results['best_checkpoint_path'])} (epoch {results.get('best_epoch')})")
    for error in results.get("save_errors") or []:
        print(f"  ⚠️ a checkpoint save failed: {error}")
    if results.get("status") == "interrupted":
        print("Training was interrupted: a checkpoint was saved. Re-run this cell to continue from it.")
    print("Namespace: results, metrics_df, workspace_root, training_config, config, drift_data, model, db, run_id.")
    print("Next: Dashboard, Diagnostic, Best model, CSV export, Inference.")


@text_output
def run(ns: dict[str, Any], resume: str | None = None, progress: bool = True) -> None:
    """`resume`: None follows the Parameters cell ("auto" = continue the run when it has a checkpoint)."""
    from ..engine.checkpoint import CheckpointError
    from ..engine.data import CorpusError
    from ..engine.experiment_db import ExperimentDB, ExperimentDBError
    from ..engine.runlock import RunLocked
    from ..engine.trainer import ResumeError

    chosen = _chosen_config(ns)
    if chosen is None:
        return
    config, scratch, planned_resume = chosen
    resume = resume or planned_resume
    try:
        task = task_arguments(ns)
    except TypeError as exc:
        print(f"❌ {exc}.")
        print("   Next: fix build_task in the Model cell and re-run it, then this cell.")
        return
    if scratch:
        _clear_scratch(config)
    import torch

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    expected = (ConfigError, CorpusError, CheckpointError, ResumeError, RunLocked, ExperimentDBError, OSError)
    mode = "continue" if resume == "auto" else f"from exactly {show_path(resume)}"
    print(f"Training run '{config.run_name}' in {show_path(config.workspace_root)} (resume: {mode}) ...")
    try:
        results, model, events = _fit(config, resume, progress, task)
    except out_of_memory as exc:
        print(f"❌ Training ran out of device memory: {str(exc).splitlines()[0]}")
        print("   Next: pick a smaller preset (or batch_size) in Parameters; the checkpoints on disk are intact.")
        return
    except expected as exc:
        print(f"❌ Training stopped: {notebook_words(str(exc))}")
        print("   Nothing good on disk was touched: fix the cause, then re-run this cell to resume from the newest")
        print("   checkpoint, or run the Recovery cell to analyse what is saved.")
        return
    close_db(ns)
    try:
        db = ExperimentDB(config.db_path)
    except ExperimentDBError as exc:
        db = None
        print(f"⚠️ experiment database unavailable ({exc}); everything else works without it.")
    saved_config = TrainingConfig.from_dict(results["config"]).replace(workspace_root=config.workspace_root)
    publish(ns, results, saved_config, db=db, run_id=results.get("run_id"), model=model)
    # Re-running this cell continues the run just trained (never clears it, never picks a new name).
    ns["scratch_workspace"], ns["planned_config"], ns["planned_resume"] = False, saved_config, "auto"
    ns[RUN_ACTION], ns[TRAINED_RUN] = "training", str(saved_config.run_dir.resolve())
    _report(results, events.said, rows_shown=events.rows_printed > 0)
