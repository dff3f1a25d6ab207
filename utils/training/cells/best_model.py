"""The Best model cell: the best epoch by val/loss, its metrics, and a check of the best checkpoint on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._namespace import check, problem, show_path, text_output

OPTIONAL_METRICS = {
    "train/perplexity": ("train perplexity", ".2f"),
    "learning_rate": ("learning rate", ".2e"),
    "grad_norm": ("gradient norm", ".3f"),
    "tokens_per_second": ("throughput (tokens/s)", ",.0f"),
    "epoch_seconds": ("epoch time (s)", ".1f"),
    "drift/token_js": ("drift: token JS divergence", ".4f"),
    "drift/probe_entropy": ("drift: probe entropy (nats)", ".3f"),
}


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    try:
        return None if value is None or value != value else float(value)  # NaN counts as missing
    except (TypeError, ValueError):
        return None


def verified_best(results: dict[str, Any], recorded: Path) -> tuple[Path | None, dict[str, Any]]:
    """The best checkpoint of the run whose every hash matches (the recorded one when it does), and
    its manifest; each damaged one passed over is named. The same full check as Training's resume,
    so a damaged best never sends the user back to Recovery, which would pick it again."""
    from ..engine.checkpoint_index import best_verified_checkpoint
    from ..engine.integrity import verify_cached

    config = results.get("config") or {}
    path, passed_over = best_verified_checkpoint(
        recorded.parent,
        recorded=recorded if recorded.is_dir() else None,
        monitor_metric=str(config.get("monitor_metric") or "val/loss"),
        monitor_mode=str(config.get("monitor_mode") or "min"),
    )
    if not recorded.is_dir():
        print(f"⚠️ The best checkpoint {show_path(recorded)} is gone (moved, or deleted by retention).")
    for item in passed_over[:5]:
        print(f"⚠️ Passed over {show_path(item['path'])}: {item['reason']}")
    if len(passed_over) > 5:
        print(f"   ... and {len(passed_over) - 5} more damaged checkpoint(s)")
    if path is None:
        print(f"❌ No checkpoint of run '{results.get('run_name')}' passes the full integrity check.")
        print("Next: train it again as a new run (Parameters cell, resume: start a new run), then the Training cell;")
        print("   the damaged checkpoints stay on disk untouched.")
        return None, {}
    if path != recorded:
        print(f"⚠️ Using {show_path(path)} instead: the best checkpoint of this run that verifies.")
    return path, verify_cached(path)


@text_output
def run(ns: dict[str, Any], metric: str = "val/loss") -> None:
    from ..analysis import best_epoch_row, metrics_frame
    from ..engine.foreign_runs import load_hint

    if not check(ns, ["results"], cell="Best model"):
        return
    results = ns["results"]
    if problem(ns, "metrics_df") is None:
        frame = ns["metrics_df"]
    else:
        print("metrics_df is missing: using the metrics in `results`.")
        frame = metrics_frame(results)
    row, fell_back = best_epoch_row(frame, metric, "min")
    if row is None:
        print("⚪ The run has no completed epoch yet, so there is no best epoch.")
        print("Next: let the Training cell finish an epoch, or recover a run that has one.")
        return
    epoch = int(row["epoch"])
    if fell_back:
        print(f"⚠️ {metric} was not recorded as a number in any epoch: showing the last epoch ({epoch}) instead.")
    print(f"Best epoch: {epoch} of {len(frame)}" + ("" if fell_back else f" (lowest {metric})"))
    for key in ("val/loss", "val/perplexity", "train/loss"):
        value = _number(row, key)
        print(f"  {key:<28} {'n/a' if value is None else format(value, '.4f')}")
    for key, (label, spec) in OPTIONAL_METRICS.items():
        if (value := _number(row, key)) is not None:
            print(f"  {label:<28} {format(value, spec)}")
    ns["best_epoch"] = epoch

    if (hint := load_hint(results)) is not None:  # a Hugging Face or Lightning run: checked by its own seal
        print(f"ℹ️ {hint}.")
        return
    recorded = results.get("best_checkpoint_path") or results.get("checkpoint_path")
    if not recorded:
        print("❌ The results name no checkpoint. Next: run the Recovery cell to read the run from disk.")
        return
    path, manifest = verified_best(results, Path(recorded))
    if path is None:
        return
    ns["best_checkpoint_path"] = str(path)
    saved_epoch = manifest.get("epoch")
    note = "" if saved_epoch in (None, epoch) else f"; it holds epoch {saved_epoch}, the best one kept on disk"
    print(f"✅ Best checkpoint: {show_path(path)} ({len(manifest['files'])} files, every hash verified{note})")
    print("Next: the Inference cell loads these weights and generates a sample.")
