"""The Training cell: train the planned run, resuming it automatically, and publish the namespace."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainingConfig
from ._namespace import SCRATCH_WORKSPACE, close_db, publish, show_path, text_output
from .parameters import DEFAULTS, plan


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def print_epochs(results: dict[str, Any]) -> None:
    print("  epoch  train/loss  val/loss  val/perplexity")
    for row in results.get("metrics_history") or []:
        print(f"  {row['epoch']:>5}  {_fmt(row.get('train/loss'), '10.4f')}  {_fmt(row.get('val/loss'), '8.4f')}"
              f"  {_fmt(row.get('val/perplexity'), '14.2f')}")  # fmt: skip


def _chosen_config(ns: dict[str, Any]) -> tuple[TrainingConfig, bool] | None:
    """The Parameters cell's plan; else the run already in the namespace; else the form defaults."""
    if isinstance(ns.get("planned_config"), TrainingConfig):
        return ns["planned_config"], bool(ns.get("scratch_workspace"))
    if isinstance(ns.get("training_config"), TrainingConfig):
        print("Parameters cell not run: continuing the run in the namespace (training_config).")
        return ns["training_config"], False
    print("Parameters cell not run: using its defaults.")
    try:
        p = plan(ns, **DEFAULTS)
    except ConfigError as exc:
        print(f"❌ {exc}.")
        print("   Next: fix the TRAINING_* variable, or run the Parameters cell.")
        return None
    return p.config, p.scratch


def _clear_scratch(config: TrainingConfig) -> None:
    root = Path(config.workspace_root)
    # Only ever the scratch folder in the working directory, never a workspace the user chose.
    if root.resolve() == (Path.cwd() / SCRATCH_WORKSPACE).resolve():
        if root.is_dir():
            shutil.rmtree(root)
        print(f"Scratch workspace {show_path(root)}: cleared, so this run starts afresh.")


@text_output
def run(ns: dict[str, Any], resume: str = "auto", progress: bool = True) -> None:
    from ..engine.checkpoint import CheckpointError
    from ..engine.data import CorpusError
    from ..engine.experiment_db import ExperimentDB, ExperimentDBError
    from ..engine.runlock import RunLocked
    from ..engine.trainer import ResumeError, Trainer

    chosen = _chosen_config(ns)
    if chosen is None:
        return
    config, scratch = chosen
    if scratch:
        _clear_scratch(config)
    import torch

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    expected = (ConfigError, CorpusError, CheckpointError, ResumeError, RunLocked, ExperimentDBError, OSError)
    print(f"Training run '{config.run_name}' in {show_path(config.workspace_root)} (resume={resume}) ...")
    try:
        trainer = Trainer(config, resume=resume, progress=progress)
        try:
            results = trainer.fit()
        finally:
            trainer.runtime.close()
    except out_of_memory as exc:
        print(f"❌ Training ran out of device memory: {str(exc).splitlines()[0]}")
        print("   Next: pick a smaller preset (or batch_size) in Parameters; the checkpoints on disk are intact.")
        return
    except expected as exc:
        print(f"❌ Training stopped: {exc}")
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
    publish(ns, results, saved_config, db=db, run_id=results.get("run_id"), model=trainer.model)
    ns["scratch_workspace"] = False  # re-running this cell continues the run just trained

    for message in results.get("messages") or []:
        print(f"  {message}")
    history = results.get("metrics_history") or []
    print(f"{'✅' if results.get('status') == 'completed' else '⚠️'} Run '{results['run_name']}' (run id "
          f"{results.get('run_id')}): {results.get('status')}, {len(history)} epoch(s), step {results.get('step')} "
          f"of {results.get('total_steps')}")  # fmt: skip
    print_epochs(results)
    print(f"  newest checkpoint: {show_path(results['checkpoint_path'])}")
    print(f"  best checkpoint:   {show_path(results['best_checkpoint_path'])} (epoch {results.get('best_epoch')})")
    for error in results.get("save_errors") or []:
        print(f"  ⚠️ a checkpoint save failed: {error}")
    if results.get("status") == "interrupted":
        print("Training was interrupted: a checkpoint was saved. Re-run this cell to continue from it.")
    print("Namespace: results, metrics_df, workspace_root, training_config, config, drift_data, model, db, run_id.")
    print("Next: Dashboard, Diagnostic, Best model, CSV export, Inference.")
