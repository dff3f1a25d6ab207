"""Drift metrics computed while training, once per epoch, from tensors the loop already has
(the loop and evaluation.py assemble them; update ratios there cover any task).

- `drift/token_js`: Jensen-Shannon divergence (bits, 0..1) between the byte distribution of
  the epoch's training batches and the validation split: is the model seeing held-out-like data?
- `drift/probe_entropy` and `drift/entropy_shift`: mean predictive entropy (nats) on a fixed
  probe batch, and its change since the previous epoch: how fast the model's confidence moves.
- `drift/update_ratio/<group>`: ||w_after - w_before|| / ||w_before|| over the epoch's last
  optimizer step, per layer group (embed, attn, mlp, norm): which part of the network moves.
- `drift/grad_norm_var`: variance of the per-step gradient norm within the epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def variance_from_sums(total: float, total_sq: float, count: int) -> float:
    if count < 2:
        return 0.0
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0) * count / (count - 1)
