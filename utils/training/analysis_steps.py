"""Step-level curves and a task's own metrics: the step table and its CSV (`<run>_steps.csv`), and
the dashboard panels that draw them (one per step series, one per numeric task metric)."""

from __future__ import annotations

from typing import Any

import pandas as pd

# Epoch columns every task has, drawn by the fixed panels: anything else numeric under
# train/ or val/ is the task's own metric and gets a panel.
BUILT_IN_METRICS = {"loss", "perplexity"}
STEP_COLUMNS = ("step", "epoch", "train/loss", "learning_rate", "grad_norm", "time")


def steps_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per logged step interval (results["step_history"]), sorted by step."""
    rows = [r for r in results.get("step_history") or [] if isinstance(r, dict) and "step" in r]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(STEP_COLUMNS))
    frame = frame.sort_values("step", kind="stable").reset_index(drop=True)
    first = [c for c in STEP_COLUMNS if c in frame.columns]
    return frame[first + sorted(c for c in frame.columns if c not in first)]


def task_metric_names(frame: pd.DataFrame) -> list[str]:
    """Names of the task's own numeric epoch metrics: `accuracy` for train/accuracy, val/accuracy."""
    names = set()
    for column in frame.columns:
        split, _, name = str(column).partition("/")
        task_metric = split in ("train", "val") and name and name not in BUILT_IN_METRICS and "/" not in name
        if task_metric and pd.to_numeric(frame[column], errors="coerce").notna().any():
            names.add(name)
    return sorted(names)


def step_series(steps: pd.DataFrame) -> list[str]:
    """Step columns drawn as curves: the loss, then each task metric."""
    if steps.empty:
        return []
    return [c for c in steps.columns if str(c).startswith("train/")]


def extra_panel_count(frame: pd.DataFrame, steps: pd.DataFrame) -> int:
    return len(step_series(steps)) + len(task_metric_names(frame))


def draw_extra_panels(axes: list, frame: pd.DataFrame, steps: pd.DataFrame, finish: Any) -> None:
    """Per-step curves (x: step), then one panel per task metric (x: epoch, train and val)."""
    series = step_series(steps)
    for ax, column in zip(axes, series, strict=False):
        values = pd.to_numeric(steps[column], errors="coerce")
        ax.plot(steps["step"], values, linewidth=1.2, label=f"{column} (mean per logging interval)")
        finish(ax, f"Per step · {column}", column.partition("/")[2], True)
        ax.set_xlabel("step")
    for ax, name in zip(axes[len(series) :], task_metric_names(frame), strict=False):
        drawn = False
        for split, label in (("train", "train (epoch mean)"), ("val", "validation")):
            column = f"{split}/{name}"
            if column in frame.columns:
                values = pd.to_numeric(frame[column], errors="coerce")
                if values.notna().any():
                    ax.plot(frame["epoch"], values, marker="o", label=label)
                    drawn = True
        finish(ax, f"Task metric · {name}", name, drawn)
