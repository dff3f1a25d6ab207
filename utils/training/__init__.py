"""Training that survives its runtime: a checkpointing, recoverable training library.

`TrainingConfig` is imported eagerly (no torch); `Task` and `CheckpointedRun` are lazy exports,
imported on first use, so that `import utils.training` and `recover` never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import PRESETS, ConfigError, TrainingConfig

# name -> module (relative to this package) that defines it; imported on first attribute access
_LAZY_EXPORTS = {
    "Task": ".engine.task",
    "CheckpointedRun": ".engine.checkpointed_run",
}

__all__ = ["PRESETS", "CheckpointedRun", "ConfigError", "Task", "TrainingConfig"]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
