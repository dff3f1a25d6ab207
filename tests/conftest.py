"""Shared fixtures: tiny configs, one trained run per session that tests copy instead of retraining."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from utils.training.config import TrainingConfig

# Two shared CPU cores: one intra-op thread keeps tests from fighting each other, and the
# uninterrupted and resumed runs of the bit-identity tests use the same kernel choices.
torch.set_num_threads(1)

RUN_NAME = "r"
# The shared run: 2 epochs of 5 steps, a step checkpoint every 3 steps, all kept, so it holds
# step-000003 (mid-epoch 1), step-000005 (end of epoch 1), step-000006, step-000009 (mid-epoch 2)
# and step-000010 (end of epoch 2).
SHARED_RUN = dict(epochs=2, steps_per_epoch=5, save_every_steps=3, keep_last=0)
SHARED_STEPS = (3, 5, 6, 9, 10)


def tiny_config(workspace: Path, **overrides: Any) -> TrainingConfig:
    """The `tiny` preset shrunk further for tests: a few steps, a small corpus slice, no time saves."""
    settings: dict[str, Any] = dict(
        workspace_root=str(workspace),
        run_name=RUN_NAME,
        epochs=2,
        steps_per_epoch=4,
        eval_batches=2,
        batch_size=4,
        corpus_max_bytes=400_000,
        save_every_seconds=0,
        device="cpu",
    )
    settings.update(overrides)
    return TrainingConfig.from_preset("tiny", **settings)


@pytest.fixture
def make_config() -> Callable[..., TrainingConfig]:
    return tiny_config


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train the shared run once per session. Read-only: copy it with `workspace_copy` to change it."""
    from utils.training.engine.trainer import Trainer

    workspace = tmp_path_factory.mktemp("shared") / "ws"
    config = tiny_config(workspace, **SHARED_RUN)
    trainer = Trainer(config, resume="never", progress=False)
    results = trainer.fit()
    return {"workspace": workspace, "config": config, "results": results}


@pytest.fixture
def workspace_copy(trained_workspace: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the shared trained workspace, free to damage."""
    target = tmp_path / "ws"
    shutil.copytree(trained_workspace["workspace"], target, symlinks=True)
    return target


@pytest.fixture
def shared_steps() -> tuple[int, ...]:
    """The checkpoint steps the shared run holds."""
    return SHARED_STEPS
