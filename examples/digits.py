"""A small classifier on scikit-learn's bundled digits (8x8 images, 1,797 of them, no download):
an MLP with BatchNorm and dropout on a shuffled map-style dataset, reporting accuracy.

    python -m utils.training train --task examples.digits:build_task --epochs 5 --batch-size 32

Needs scikit-learn (`pip install .[examples]`). task_options: `hidden` (width, default 64),
`train_samples` (use only the first N training images, default all).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from utils.training import Task, TrainingConfig

VALIDATION_IMAGES = 297  # held out by a fixed permutation, the same on every run


def load_split() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val, train = order[:VALIDATION_IMAGES], order[VALIDATION_IMAGES:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10)
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    images, labels = batch
    logits = model(images)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return nn.functional.cross_entropy(logits, labels), {"accuracy": accuracy}


def build_task(config: TrainingConfig) -> Task:
    options = config.task_options
    train, val = load_split()
    if options.get("train_samples"):
        train = TensorDataset(*(t[: int(options["train_samples"])] for t in train.tensors))

    def predict(model: nn.Module, prompt: str, **_: object) -> str:
        """The Inference cell's prompt is the index of a validation image."""
        index = int(prompt.strip() or 0) % len(val)
        image, label = val[index]
        model.eval()
        with torch.no_grad():
            guess = int(model(image.unsqueeze(0).to(next(model.parameters()).device)).argmax())
        return f"validation image {index}: predicted {guess}, label {int(label)}"

    return Task(
        model=make_model(int(options.get("hidden", 64))),
        train_data=train,
        val_data=val,
        loss_fn=loss_fn,
        sample_fn=predict,
    )
