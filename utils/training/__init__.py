"""Training that survives its runtime: a checkpointing, recoverable training library.

`TrainingConfig` is imported eagerly (no torch); `Task`, `LanguageModel`, `TaskError`,
`CheckpointedRun`, `Trainer` and `train` are lazy exports, imported on first use, so that
`import utils.training` and `recover` never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import PRESETS, ConfigError, TrainingConfig

# name -> (module, attribute); imported on first attribute access
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
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
