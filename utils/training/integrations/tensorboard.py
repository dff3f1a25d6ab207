"""TensorBoard: a run's step and epoch metrics as event files in <workspace>/tensorboard/<run>, with no step twice after a resume.

Step rows (as in steps.jsonl) are written under `step/<metric>`, epoch rows (as in
metrics.jsonl) under `<metric>`, both against the global step, the names MLflow export uses.
A resumed run opens its writer with `purge_step` = the resume step + 1: TensorBoard then drops
every event an earlier process wrote past the checkpoint it resumed from, so replayed steps
appear once. Colab: `%load_ext tensorboard` then `%tensorboard --logdir <workspace>/tensorboard`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
EVENTS_LOGGER = "utils.training.events"
_NOT_METRICS = {"step", "epoch", "time"}


class TensorBoardUnavailable(ImportError):
    """The `tensorboard` package is not installed; `fix` says how to install it."""

    def __init__(self) -> None:
        self.fix = "pip install 'training-survives[tensorboard]' (or pip install tensorboard), or turn tensorboard off"
        super().__init__(f"TensorBoard logging needs the tensorboard package: {self.fix}")


def tensorboard_dir(workspace_root: str | os.PathLike, run_name: str) -> Path:
    """`<workspace>/tensorboard/<run_name>`: one run's event files."""
    return Path(workspace_root) / TENSORBOARD_DIR / run_name


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    found = {}
    for key, value in row.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            found[key] = float(value)
    return found


class TensorBoardLogger:
    """One run's SummaryWriter. `start_step` is the number of steps already done (0 for a new
    run, the checkpoint's step after a resume or a rollback): events past it are purged."""

    def __init__(self, log_dir: str | os.PathLike, *, start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorBoardUnavailable() from exc
        self.log_dir = Path(log_dir)
        self.start_step = int(start_step)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.start_step + 1)

    @classmethod
    def for_run(cls, workspace_root: str | os.PathLike, run_name: str, *, start_step: int = 0) -> TensorBoardLogger:
        return cls(tensorboard_dir(workspace_root, run_name), start_step=start_step)

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """A step row (train/loss over the interval, learning_rate, grad_norm, ...) as `step/<name>`."""
        for name, value in _scalars(metrics).items():
            self._writer.add_scalar(f"step/{name}", value, global_step=int(step))

    def log_epoch(self, step: int, row: dict[str, Any]) -> None:
        """An epoch row (train/loss, val/loss, drift, ...) under its own names, at the epoch's last step."""
        for name, value in _scalars(row).items():
            self._writer.add_scalar(name, value, global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tensorboard_for(config: Any, *, start_step: int) -> TensorBoardLogger | None:
    """The run's logger when `config.tensorboard` is on (None when off): what the trainer opens on
    the main process once it knows the step it starts from (0, or the resumed/branch checkpoint's)."""
    if not getattr(config, "tensorboard", False):
        return None
    return TensorBoardLogger.for_run(config.workspace_root, config.run_name, start_step=start_step)


class TensorBoardEvents(logging.Handler):
    """Feeds a TensorBoardLogger from the trainer's live events: each INFO record on
    "utils.training.events" with `extra={"epoch_row": row}` (or `{"step_row": row}`)."""

    def __init__(self, tensorboard: TensorBoardLogger) -> None:
        super().__init__(level=logging.INFO)
        self.tensorboard = tensorboard

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if isinstance(row := getattr(record, "epoch_row", None), dict):
                self.tensorboard.log_epoch(int(row.get("step", row.get("epoch", 0))), row)
                self.tensorboard.flush()
            if isinstance(row := getattr(record, "step_row", None), dict):
                self.tensorboard.log_step(int(row["step"]), row)
        except Exception:  # logging must never break training
            self.handleError(record)

    def attach(self) -> TensorBoardEvents:
        logging.getLogger(EVENTS_LOGGER).addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger(EVENTS_LOGGER).removeHandler(self)
        self.tensorboard.close()
