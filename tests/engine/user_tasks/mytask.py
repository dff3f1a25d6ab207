"""A user-written task as a newcomer would write it: an MLP with BatchNorm and dropout on a
shuffled map-style dataset, reporting accuracy. Tests copy this file into a temporary folder
and train it with `python -m utils.training train --task mytask:build`."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from utils.training import Task


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def loss_fn(model: nn.Module, batch):
    x, y = batch
    logits = model(x)
    accuracy = (logits.argmax(dim=1) == y).float().mean()
    return nn.functional.cross_entropy(logits, y), {"accuracy": accuracy}


def build(config) -> Task:
    return Task(
        model=Net(),
        train_data=make_data(96, seed=0),
        val_data=make_data(40, seed=1),
        loss_fn=loss_fn,
        num_workers=int(config.task_options.get("workers", 0)),
    )
