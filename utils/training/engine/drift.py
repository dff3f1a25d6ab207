"""Drift metrics computed while training, once per epoch, from tensors the loop already has.

- `drift/token_js`: Jensen-Shannon divergence (bits, 0..1) between the byte distribution of
  the epoch's training batches and the validation split: is the model seeing held-out-like data?
- `drift/probe_entropy` and `drift/entropy_shift`: mean predictive entropy (nats) on a fixed
  probe batch, and its change since the previous epoch: how fast the model's confidence moves.
- `drift/update_ratio/<group>`: ||w_after - w_before|| / ||w_before|| over the epoch's last
  optimizer step, per layer group (embed, attn, mlp, norm): which part of the network moves.
- `drift/grad_norm_var`: variance of the per-step gradient norm within the epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .metrics_log import drift_history  # noqa: F401 - derived from the metrics rows; re-exported
from .model import parameter_group


def js_divergence(p_counts: torch.Tensor, q_counts: torch.Tensor) -> float:
    p = p_counts.double() / p_counts.sum().clamp_min(1)
    q = q_counts.double() / q_counts.sum().clamp_min(1)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mask = a > 0
        return (a[mask] * (a[mask] / b[mask]).log2()).sum()

    return float(0.5 * kl(p, m) + 0.5 * kl(q, m))


@torch.no_grad()
def mean_prediction_entropy(model: torch.nn.Module, probe: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    logits = model(probe).float()
    model.train(was_training)
    log_probs = F.log_softmax(logits, dim=-1)
    return float(-(log_probs.exp() * log_probs).sum(-1).mean())


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP DTensor) parameter gathered whole; a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p.detach()).clone() for name, p in model.named_parameters()}


@torch.no_grad()
def update_ratios(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    delta_sq: dict[str, torch.Tensor] = {}
    base_sq: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        group = parameter_group(name)
        old = before[name]
        delta_sq[group] = delta_sq.get(group, 0) + (_full(p.detach()).float() - old.float()).pow(2).sum()
        base_sq[group] = base_sq.get(group, 0) + old.float().pow(2).sum()
    return {
        f"drift/update_ratio/{g}": float(delta_sq[g].sqrt() / base_sq[g].sqrt().clamp_min(1e-12))
        for g in sorted(delta_sq)
    }


def variance_from_sums(total: float, total_sq: float, count: int) -> float:
    if count < 2:
        return 0.0
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0) * count / (count - 1)


def epoch_drift(
    *,
    model: torch.nn.Module,
    probe: torch.Tensor,
    train_token_counts: torch.Tensor,
    val_token_counts: torch.Tensor,
    grad_norm_sum: float,
    grad_norm_sq_sum: float,
    steps: int,
    update_ratio: dict[str, float],
    previous_entropy: float | None,
) -> dict[str, float]:
    entropy = mean_prediction_entropy(model, probe)
    shift = 0.0 if previous_entropy is None or not math.isfinite(previous_entropy) else entropy - previous_entropy
    return {
        "drift/token_js": js_divergence(train_token_counts, val_token_counts),
        "drift/probe_entropy": entropy,
        "drift/entropy_shift": shift,
        "drift/grad_norm_var": variance_from_sums(grad_norm_sum, grad_norm_sq_sum, steps),
        **update_ratio,
    }
