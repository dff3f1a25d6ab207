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


@text_output
def run(ns: dict[str, Any], metric: str = "val/loss") -> None:
    from ..analysis import best_epoch_row, metrics_frame
    from ..engine.commit import CheckpointCorrupt, verify

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

    path = results.get("best_checkpoint_path") or results.get("checkpoint_path")
    if not path:
        print("❌ The results name no checkpoint. Next: run the Recovery cell to read the run from disk.")
        return
    path = Path(path)
    if not path.is_dir():
        print(f"❌ Best checkpoint {show_path(path)} does not exist (moved, or deleted by retention).")
        print("Next: run the Recovery cell again to find the checkpoints that are on disk now.")
        return
    try:
        manifest = verify(path)
    except CheckpointCorrupt as exc:
        print(f"❌ Best checkpoint {show_path(path)} failed verification: {exc.reason}")
        print("Next: run the Recovery cell again: it passes over damaged checkpoints and finds the newest good one.")
        return
    ns["best_checkpoint_path"] = str(path)
    saved_epoch = manifest.get("epoch")
    note = "" if saved_epoch in (None, epoch) else f"; it holds epoch {saved_epoch}, the best one kept on disk"
    print(f"✅ Best checkpoint: {show_path(path)} ({len(manifest['files'])} files, every hash verified{note})")
    print("Next: the Inference cell loads these weights and generates a sample.")
