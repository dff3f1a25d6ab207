"""The end of an epoch: validation (eval mode, no_grad), the epoch's metrics row, drift, and
which checkpoint is the best so far."""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from typing import Any

import torch

from .batches import validation_batches
from .checkpoint import step_dir_name
from .drift import js_divergence, mean_prediction_entropy, variance_from_sums
from .task import batch_size_of, move_to_device, split_loss_output
from .train_state import RunningSums, TrainState

LM_PERPLEXITY_CAP = 50.0  # exp() of a loss above this overflows nothing but says nothing either


@torch.no_grad()
def evaluate(ts: TrainState, autocast: AbstractContextManager | Any) -> tuple[float, dict[str, float]]:
    """Mean validation loss and metrics over the validation data, weighted by batch size."""
    model, device = ts.model, ts.device
    was_training = model.training
    model.eval()
    sums = RunningSums.fresh(device)
    try:
        for batch in validation_batches(ts.task, batch_size=ts.config.batch_size, limit=ts.config.eval_batches):
            size = batch_size_of(batch)
            with autocast():
                loss, metrics = split_loss_output(ts.task.loss_fn(model, move_to_device(batch, device)))
            sums.add(loss.float(), metrics, size, torch.zeros((), device=device))
    finally:
        model.train(was_training)
    if not sums.samples:
        return float("nan"), {}
    return float(sums.loss) / sums.samples, {k: float(v) / sums.samples for k, v in sorted(sums.metrics.items())}


def reduced_means(ts: TrainState, sums: RunningSums, runtime: Any) -> dict[str, float]:
    """The epoch's (or interval's) means across ranks: loss and metrics by sample, grad norm by step."""
    names = sorted(sums.metrics)
    stacked = torch.stack([sums.loss, sums.grad_norm, sums.grad_norm_sq, *(sums.metrics[n] for n in names),
                           torch.tensor(float(sums.samples), dtype=torch.float64, device=sums.loss.device)])  # fmt: skip
    total = runtime.all_reduce_sum(stacked.double()).tolist()
    samples = max(total[-1], 1.0)
    steps = max(sums.steps * runtime.world_size, 1)
    means = {"loss": total[0] / samples, "grad_norm": total[1] / steps}
    means["grad_norm_var"] = variance_from_sums(
        total[1] / runtime.world_size, total[2] / runtime.world_size, sums.steps
    )
    for i, name in enumerate(names):
        means[f"metric/{name}"] = total[3 + i] / samples
    return means


def epoch_row(ts: TrainState, *, runtime: Any, autocast: Any, update_ratio: dict[str, float],
              epoch_seconds: float) -> dict[str, Any]:  # fmt: skip
    """The metrics.jsonl row of the epoch that just ended."""
    sums = ts.epoch_sums
    means = reduced_means(ts, sums, runtime)
    row: dict[str, Any] = {"epoch": ts.epoch, "step": ts.progress.step, "train/loss": means["loss"]}
    row.update({f"train/{k[7:]}": v for k, v in means.items() if k.startswith("metric/")})
    if ts.task.val_data is not None:
        val_loss, val_metrics = evaluate(ts, autocast)
        row["val/loss"] = val_loss
        row.update({f"val/{k}": v for k, v in val_metrics.items()})
    row.update(learning_rate=ts.learning_rate(), grad_norm=means["grad_norm"], epoch_seconds=epoch_seconds)
    lm = ts.task.language_model
    if lm is None:  # a language model reports tokens_per_second instead
        row["samples_per_second"] = sums.samples * runtime.world_size / max(epoch_seconds, 1e-9)
    row["time"] = time.time()
    if lm is not None:
        row["train/perplexity"] = math.exp(min(row["train/loss"], LM_PERPLEXITY_CAP))
        if "val/loss" in row:
            row["val/perplexity"] = math.exp(min(row["val/loss"], LM_PERPLEXITY_CAP))
        counts = runtime.all_reduce_sum(sums.token_counts).cpu()
        row["tokens_per_second"] = float(counts.sum()) / max(epoch_seconds, 1e-9)
        if lm.val_token_counts is not None:
            row["drift/token_js"] = js_divergence(counts, lm.val_token_counts)
        if lm.probe is not None:
            entropy = mean_prediction_entropy(_Logits(ts.model, lm.logits), lm.probe.to(ts.device))
            previous = (
                ts.progress.metrics_history[-1].get("drift/probe_entropy") if ts.progress.metrics_history else None
            )
            row["drift/probe_entropy"] = entropy
            row["drift/entropy_shift"] = 0.0 if previous is None or not math.isfinite(previous) else entropy - previous
    row["drift/grad_norm_var"] = means["grad_norm_var"]
    row.update(update_ratio)
    return row


class _Logits(torch.nn.Module):
    """The task's logits function as a module, so the drift probe can call it like a model."""

    def __init__(self, model: torch.nn.Module, logits: Any) -> None:
        super().__init__()
        self.inner = model
        self._logits = logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._logits(self.inner, ids)


def update_best(ts: TrainState, row: dict[str, Any], say: Any) -> None:
    """Best follows monitor_metric/monitor_mode; with no validation data the newest is the best."""
    cfg, p = ts.config, ts.progress
    monitored = row.get(cfg.monitor_metric)
    if ts.task.val_data is None and not isinstance(monitored, (int, float)):
        if not p.said_no_validation and not p.metrics_history[:-1]:
            say(f"this task has no validation data, so {cfg.monitor_metric} is not measured: the newest checkpoint "
                "counts as the best")  # fmt: skip
        p.said_no_validation = True
        p.best = {"metric": "newest", "mode": cfg.monitor_mode, "step": p.step, "epoch": row["epoch"],
                  "checkpoint": step_dir_name(p.step)}  # fmt: skip
        return
    if not isinstance(monitored, (int, float)) or not math.isfinite(monitored):
        return
    best = p.best
    better = (
        best is None
        or not isinstance(best.get("value"), (int, float))
        or (  # noqa: SIM114
            monitored < best["value"] if cfg.monitor_mode == "min" else monitored > best["value"]
        )
    )
    if better:
        p.best = {"metric": cfg.monitor_metric, "mode": cfg.monitor_mode, "value": monitored, "step": p.step,
                  "epoch": row["epoch"], "checkpoint": step_dir_name(p.step)}  # fmt: skip


def top_level_group(name: str) -> str:
    """A parameter's top-level submodule: `encoder.layer.0.weight` -> `encoder`."""
    return name.split(".", 1)[0]


def snapshot_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p.detach()).clone() for name, p in model.named_parameters()}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP DTensor) parameter gathered whole; a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def update_ratios(before: dict[str, torch.Tensor], model: torch.nn.Module, group_of: Any) -> dict[str, float]:
    """||w_after - w_before|| / ||w_before|| over the epoch's last optimizer step, per group."""
    delta_sq: dict[str, Any] = {}
    base_sq: dict[str, Any] = {}
    for name, p in model.named_parameters():
        group = group_of(name)
        old = before[name]
        delta_sq[group] = delta_sq.get(group, 0) + (_full(p.detach()).float() - old.float()).pow(2).sum()
        base_sq[group] = base_sq.get(group, 0) + old.float().pow(2).sum()
    return {
        f"drift/update_ratio/{g}": float(delta_sq[g].sqrt() / base_sq[g].sqrt().clamp_min(1e-12))
        for g in sorted(delta_sq)
    }
