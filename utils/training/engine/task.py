"""The Task API: what a user hands the trainer (model, data, loss), checked once, and the small
helpers the loop applies to it (import a builder by path, move a batch to the device, read
what `loss_fn` returned).

    def build(config: TrainingConfig) -> Task:
        return Task(model=MyNet(), train_data=train_ds, val_data=val_ds, loss_fn=my_loss)

The trainer seeds every RNG from `config.seed`, then calls the builder, so a plain builder
gives the same initial weights every time.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_TASK_PATH = "utils.training.engine.lm_task:build_task"
NOTEBOOK_TASK_PATH = "notebook:build_task"
RESERVED_METRIC_NAMES = ("loss", "epoch", "step")

LossOutput = Any  # a loss tensor, or (loss tensor, {name: float or 0-d tensor})


class TaskError(ValueError):
    """A task (or its builder, or what its loss_fn returned) cannot be used; says what and the fix."""


@dataclass(kw_only=True)
class LanguageModel:
    """Marks a task as a language model, so epochs also report perplexity, tokens/s and the token
    drift metrics. `inputs(batch)` gives the token ids of a batch (on the CPU, before the batch
    moves to the device); `logits(model, ids)` the next-token logits for ids on the device."""

    vocab_size: int
    inputs: Callable[[Any], torch.Tensor]
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    val_token_counts: torch.Tensor | None = None  # histogram of the validation tokens (token_js drift)
    probe: torch.Tensor | None = None  # a fixed batch of ids: mean predictive entropy each epoch


@dataclass(kw_only=True)
class Task:
    """A model, its data and its loss: everything the trainer needs to train it.

    - `model`: any torch.nn.Module (buffers, BatchNorm and dropout are fine).
    - `train_data`: a map-style Dataset (shuffled by a seeded sampler whose position is in every
      checkpoint) or an iterable one (resumed exactly when it has `state_dict`/`load_state_dict`).
    - `val_data`: the same kinds, or None (then the newest checkpoint is the best).
    - `loss_fn(model, batch)`: a loss tensor, or `(loss, {"accuracy": acc, ...})`; metric values
      are floats or 0-d tensors, averaged per epoch (weighted by batch size) into
      `train/<name>` and `val/<name>`.
    - `collate_fn`: how samples become a batch (default: torch's default_collate).
    - `make_optimizer(model, config)`: an Optimizer, or `(optimizer, scheduler)`; default AdamW
      with warmup + cosine over the run.
    - `sample_fn(model, prompt, **options) -> str`: what the notebook's Inference cell calls.
    - `batched`: the data already yields whole batches (an iterable stream of batches, or a list
      of batches); the trainer then does not batch or collate it.
    - `num_workers`: DataLoader worker processes for a map-style dataset.
    - `drop_last`: leave out the short last batch of each pass over a map-style dataset (BatchNorm
      cannot train on a batch of one sample).
    - `language_model`: see LanguageModel.
    - `parameter_group(name) -> str`: groups parameters for `drift/update_ratio/<group>`
      (default: the top-level submodule).
    - `data_fingerprint`: a short hash of the data, stored with checkpoints to notice a change.
    """

    model: torch.nn.Module
    train_data: Any
    loss_fn: Callable[[torch.nn.Module, Any], LossOutput]
    val_data: Any = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    make_optimizer: Callable[..., Any] | None = None
    sample_fn: Callable[..., str] | None = None
    batched: bool = False
    num_workers: int = 0
    drop_last: bool = False
    language_model: LanguageModel | None = None
    parameter_group: Callable[[str], str] | None = None
    data_fingerprint: str | None = None

    def check(self, builder: str) -> None:
        """Raise TaskError naming the field when this task cannot be trained."""
        if not isinstance(self.model, torch.nn.Module):
            raise TaskError(f"{builder}: Task.model is a {type(self.model).__name__}, not a torch.nn.Module")
        if self.train_data is None:
            raise TaskError(f"{builder}: Task.train_data is None; give a torch Dataset (map-style or iterable)")
        if not callable(self.loss_fn):
            raise TaskError(f"{builder}: Task.loss_fn is not callable; give a function (model, batch) -> loss")
        for name in ("collate_fn", "make_optimizer", "sample_fn", "parameter_group"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TaskError(f"{builder}: Task.{name} is not callable")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise TaskError(f"{builder}: Task.num_workers={self.num_workers!r}; give an integer >= 0")


def task_module_path() -> None:
    """Put the current folder on sys.path, so `--task mytask:build` finds ./mytask.py."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_builder(path: str) -> Callable[[Any], Task]:
    """Import `pkg.mod:attr` (the current folder is on sys.path) and return the builder."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task {path!r} is not of the form module:function (e.g. mytask:build)")
    task_module_path()
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(
            f"task {path!r}: cannot import module {module_name!r} ({exc}); run from the folder that holds "
            f"{module_name.replace('.', '/')}.py or install the package"
        ) from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise TaskError(f"task {path!r}: module {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TaskError(f"task {path!r} is not callable; it must be a function config -> Task")
    return target


def build_checked(builder: Callable[[Any], Task], config: Any, path: str) -> Task:
    """Call the builder and check what it returned."""
    task = builder(config)
    if not isinstance(task, Task):
        raise TaskError(f"task builder {path} returned a {type(task).__name__}, not a Task")
    task.check(path)
    return task


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors inside tuples, lists, dicts and dict-like batches (e.g. BatchEncoding) moved."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Rows in a batch: the first dimension of its first tensor (1 when it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return batch_size_of(value)
    return 1


def split_loss_output(output: LossOutput) -> tuple[torch.Tensor, dict[str, Any]]:
    """(loss, metrics) from what loss_fn returned; TaskError for anything else."""
    metrics: Any = {}
    if isinstance(output, tuple):
        if len(output) != 2:
            raise TaskError(f"loss_fn returned a tuple of {len(output)} items; return loss or (loss, metrics dict)")
        output, metrics = output
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        raise TaskError(f"loss_fn returned {type(output).__name__} as the loss; return a scalar loss tensor")
    if not isinstance(metrics, Mapping):
        raise TaskError(f"loss_fn returned {type(metrics).__name__} as metrics; return a dict of name -> number")
    for name, value in metrics.items():
        check_metric(name, value)
    return output, dict(metrics)


def check_metric(name: Any, value: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or name in RESERVED_METRIC_NAMES:
        raise TaskError(
            f"loss_fn metric name {name!r} is not allowed: use a non-empty name without '/', "
            f"other than {', '.join(RESERVED_METRIC_NAMES)}"
        )
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise TaskError(f"loss_fn metric {name!r} is a tensor of shape {tuple(value.shape)}; give a 0-d tensor")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TaskError(f"loss_fn metric {name!r}={value!r} is not a finite number")
