"""The moving parts of one run in one typed object (TrainState), with the running sums, the
counters, the default optimizer, and how all of it goes into a checkpoint and comes back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrainingConfig
from .batches import TrainBatches
from .checkpoint import LoadedCheckpoint
from .reproducibility import rng_state, set_rng_state
from .task import Task, TaskError


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def default_optimizer(model: torch.nn.Module, config: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (tensors of fewer than 2 dimensions)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        # Fused kernels on CUDA; on the CPU the multi-tensor path, ~2x faster than the default loop.
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )


def build_optimizer(task: Task, model: torch.nn.Module, config: TrainingConfig, *, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, Any]:  # fmt: skip
    """The task's optimizer factory (its scheduler, if it returns one; else none), or AdamW with
    linear warmup + cosine decay over `total_steps`."""
    if task.make_optimizer is not None:
        made = task.make_optimizer(model, config)
        optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TaskError(f"Task.make_optimizer returned {type(optimizer).__name__}, not a torch Optimizer")
        return optimizer, scheduler
    optimizer = default_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(
            s, warmup_steps=config.warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio
        ),
    )
    return optimizer, scheduler


@dataclass
class RunningSums:
    """Sums over an epoch or a logging interval. Tensors stay on the device (no host sync per
    step) and travel in checkpoints, so a resumed epoch reports what an uninterrupted one would."""

    loss: torch.Tensor  # sum of loss x batch size
    metrics: dict[str, torch.Tensor]  # sum of metric x batch size
    grad_norm: torch.Tensor
    grad_norm_sq: torch.Tensor
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0
    token_counts: torch.Tensor | None = None  # language models: the histogram of training tokens (host)

    @classmethod
    def fresh(cls, device: torch.device, vocab_size: int | None = None) -> RunningSums:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        counts = torch.zeros(vocab_size, dtype=torch.int64) if vocab_size else None
        return cls(loss=zero.clone(), metrics={}, grad_norm=zero.clone(), grad_norm_sq=zero.clone(),
                   token_counts=counts)  # fmt: skip

    def add(self, loss: torch.Tensor, metrics: dict[str, Any], size: int, grad_norm: torch.Tensor) -> None:
        self.loss += loss.detach().double() * size
        for name, value in metrics.items():
            if name not in self.metrics:
                self.metrics[name] = torch.zeros((), dtype=torch.float64, device=self.loss.device)
            value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
            self.metrics[name] += value * size
        norm = grad_norm.detach().double()
        self.grad_norm += norm
        self.grad_norm_sq += norm * norm
        self.samples += size
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Copies: the next step adds to the tensors before an async save has taken its copy."""
        state = {"loss": self.loss.clone(), "metrics": {k: v.clone() for k, v in self.metrics.items()},
                 "grad_norm": self.grad_norm.clone(), "grad_norm_sq": self.grad_norm_sq.clone(),
                 "samples": self.samples, "steps": self.steps, "seconds": self.seconds}  # fmt: skip
        if self.token_counts is not None:
            state["token_counts"] = self.token_counts.clone()
        return state

    def load_state_dict(self, state: dict[str, Any], *, batch_size: int) -> None:
        device = self.loss.device
        if "loss_sum" in state:  # the byte LM's sums before the Task API: a mean per step, fixed batch size
            state = {"loss": state["loss_sum"] * batch_size, "metrics": {}, "grad_norm": state["grad_norm_sum"],
                     "grad_norm_sq": state["grad_norm_sq_sum"], "samples": state["steps"] * batch_size,
                     "steps": state["steps"], "seconds": state["seconds"], "token_counts": state["token_counts"]}  # fmt: skip
        self.loss = state["loss"].to(device)
        self.metrics = {k: v.to(device) for k, v in state["metrics"].items()}
        self.grad_norm = state["grad_norm"].to(device)
        self.grad_norm_sq = state["grad_norm_sq"].to(device)
        self.samples, self.steps, self.seconds = int(state["samples"]), int(state["steps"]), float(state["seconds"])
        if self.token_counts is not None and "token_counts" in state:
            self.token_counts = state["token_counts"].cpu()


@dataclass
class Progress:
    """The counters and histories a checkpoint's trainer_state.json carries."""

    step: int = 0
    metrics_history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    resume_count: int = 0
    wall_seconds: float = 0.0
    run_id: int | None = None
    said_no_validation: bool = False


@dataclass(kw_only=True)
class TrainState:
    """Everything the loop moves: built once by the Trainer, restored from a checkpoint."""

    config: TrainingConfig
    task: Task
    task_path: str
    model: torch.nn.Module  # the user's module (unwrapped)
    train_model: torch.nn.Module  # what the forward pass runs: DDP/FSDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    train: TrainBatches
    steps_per_epoch: int
    total_steps: int
    device: torch.device
    progress: Progress
    epoch_sums: RunningSums
    interval_sums: RunningSums
    manager: Any = None
    db: Any = None

    def fresh_sums(self) -> RunningSums:
        lm = self.task.language_model
        return RunningSums.fresh(self.device, lm.vocab_size if lm is not None else None)

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.progress.step // self.steps_per_epoch

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def training_state(self) -> dict[str, Any]:
        """What training_state.pt holds: optimizer, scheduler, scaler, RNG, data position, sums."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng_state(),
            "data": self.train.state_dict(),
            "accumulators": self.epoch_sums.state_dict(),
            "interval": self.interval_sums.state_dict(),
        }

    def restore(self, loaded: LoadedCheckpoint, training_state: dict[str, Any], *, load_optimizer: bool) -> None:
        """Put a checkpoint's state back (the weights, and for DCP the optimizer, are loaded already)."""
        if load_optimizer:
            self.optimizer.load_state_dict(training_state["optimizer"])
        if self.scheduler is not None and training_state.get("scheduler"):
            self.scheduler.load_state_dict(training_state["scheduler"])
        if training_state.get("scaler"):
            self.scaler.load_state_dict(training_state["scaler"])
        trainer_state = loaded.trainer_state
        p = self.progress
        p.step = int(trainer_state.get("step", loaded.step))
        p.metrics_history = list(trainer_state.get("metrics_history", []))
        p.best = trainer_state.get("best")
        p.wall_seconds = float(trainer_state.get("wall_seconds", 0.0))
        p.resume_count = int(trainer_state.get("resume_count", 0)) + 1
        self.train.load_state_dict(training_state["data"], step=p.step)
        set_rng_state(training_state["rng"])
        batch_size = self.config.batch_size
        self.epoch_sums.load_state_dict(training_state["accumulators"], batch_size=batch_size)
        if "interval" in training_state:
            self.interval_sums.load_state_dict(training_state["interval"], batch_size=batch_size)
