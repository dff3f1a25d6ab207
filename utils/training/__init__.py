"""Training that survives its runtime: a checkpointing, recoverable training library."""

from .config import PRESETS, ConfigError, TrainingConfig

__all__ = ["PRESETS", "ConfigError", "TrainingConfig"]
