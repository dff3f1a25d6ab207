"""Training that survives its runtime: a checkpointing, recoverable training library."""

from __future__ import annotations

from typing import Any

from .config import PRESETS, ConfigError, TrainingConfig

# Lazy: `import utils.training` (and `recover`) must not import torch.
_LAZY = {
    "Task": ("utils.training.engine.task", "Task"),
    "LanguageModel": ("utils.training.engine.task", "LanguageModel"),
    "TaskError": ("utils.training.engine.task", "TaskError"),
    "CheckpointedRun": ("utils.training.engine.loop_api", "CheckpointedRun"),
    "Trainer": ("utils.training.engine.trainer", "Trainer"),
    "train": ("utils.training.engine.trainer", "train"),
}

__all__ = ["PRESETS", "ConfigError", "TrainingConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'utils.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
