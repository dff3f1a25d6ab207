"""Analysis of one run's results dict: metrics table, dashboard PNG, CSV export, best epoch, inference.

Shared by the notebook cells and the CLI (`dashboard`, `export`). Everything here works from
the results dict that training and recovery both return; nothing reads notebook globals.
Files are written to a temporary sibling and renamed into place, so a failed write never
replaces a good dashboard or CSV with a partial one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .analysis_steps import draw_extra_panels, extra_panel_count, steps_frame
from .config import TrainingConfig

FIRST_COLUMNS = ("epoch", "step", "train/loss", "val/loss", "val/perplexity", "train/perplexity", "learning_rate")
DRIFT_PREFIX = "drift/"
DEFAULT_RUN_NAME = "training_run"


class NothingToAnalyse(ValueError):
    """The run has no completed epoch yet, so there is no metric to plot or export."""


# -- tables -------------------------------------------------------------------------------
def metrics_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per completed epoch, sorted by epoch; the usual columns first."""
    rows = [r for r in results.get("metrics_history") or [] if isinstance(r, dict) and "epoch" in r]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(FIRST_COLUMNS))
    frame = frame.sort_values("epoch", kind="stable").reset_index(drop=True)
    first = [c for c in FIRST_COLUMNS if c in frame.columns]
    rest = sorted((c for c in frame.columns if c not in first), key=lambda c: (str(c).startswith(DRIFT_PREFIX), str(c)))
    return frame[first + rest]


def drift_frame(results: dict[str, Any]) -> pd.DataFrame | None:
    """The drift history, one row per epoch, or None when the run recorded none."""
    rows = [r for r in results.get("drift_history") or [] if isinstance(r, dict) and "epoch" in r]
    if not rows:  # an older run may carry drift only inside its metric rows
        rows = [r for r in results.get("metrics_history") or [] if any(str(k).startswith(DRIFT_PREFIX) for k in r)]
    frame = pd.DataFrame(rows)
    if frame.empty or not any(str(c).startswith(DRIFT_PREFIX) for c in frame.columns):
        return None
    return frame.sort_values("epoch", kind="stable").reset_index(drop=True)


def best_epoch_row(
    frame: pd.DataFrame, metric: str = "val/loss", mode: str = "min"
) -> tuple[dict[str, Any] | None, bool]:
    """(the row of the best epoch by `metric`, whether it fell back to the last epoch).
    Falls back when the metric is missing or never finite; (None, False) for an empty frame."""
    if frame is None or len(frame) == 0:
        return None, False
    if metric in frame.columns:
        finite = pd.to_numeric(frame[metric], errors="coerce").replace([math.inf, -math.inf], math.nan).dropna()
        if len(finite):
            index = finite.idxmin() if mode == "min" else finite.idxmax()
            return frame.loc[index].to_dict(), False
    return frame.iloc[-1].to_dict(), True


# -- output paths and atomic writes ----------------------------------------------------------
def default_output(results: dict[str, Any], suffix: str) -> Path:
    """`<workspace>/results/<run_name>_<suffix>` for this results dict."""
    workspace = results.get("workspace_root") or "."
    run_name = results.get("run_name") or DEFAULT_RUN_NAME
    return Path(workspace) / "results" / f"{run_name}_{suffix}"


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.is_file() and not tmp.is_symlink():  # a partial write of ours; never anything else
            tmp.unlink()
    return path


# -- CSV ----------------------------------------------------------------------------------
def write_metrics_csv(frame: pd.DataFrame, path: str | Path) -> tuple[Path, int]:
    """Write the per-epoch table to `path` (folders created); returns (path, rows written)."""
    written = _write_atomically(Path(path), lambda tmp: frame.to_csv(tmp, index=False))
    return written, len(frame)


def export_metrics_csv(results: dict[str, Any], output: str | Path | None = None) -> tuple[Path, int]:
    """`<workspace>/results/<run_name>_metrics.csv` (or `output`): one row per epoch."""
    frame = metrics_frame(results)
    if frame.empty:
        raise NothingToAnalyse(
            f"run {results.get('run_name')!r} has no completed epoch yet; train at least one epoch, then export"
        )
    return write_metrics_csv(frame, output or default_output(results, "metrics.csv"))


def export_steps_csv(results: dict[str, Any], output: str | Path | None = None) -> tuple[Path, int] | None:
    """`<workspace>/results/<run_name>_steps.csv` (or `output`): one row per logged step interval,
    the columns of steps.jsonl. None when the run logged no steps."""
    frame = steps_frame(results)
    if frame.empty:
        return None
    return write_metrics_csv(frame, output or default_output(results, "steps.csv"))


# -- dashboard ----------------------------------------------------------------------------
def _plot_lines(ax, frame: pd.DataFrame, columns: dict[str, str], *, log: bool = False) -> bool:
    plotted = []
    for column, label in columns.items():
        values = pd.to_numeric(frame[column], errors="coerce") if column in frame.columns else None
        if values is not None and values.notna().any():
            ax.plot(frame["epoch"], values, marker="o", label=label)
            plotted.append(values)
    if plotted and log:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 20, 30, 0.01 rather than 2x10^1
        positive = pd.concat(plotted)
        positive = positive[positive > 0]
        within_a_decade = len(positive) > 0 and positive.max() < 10 * positive.min()
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if within_a_decade else NullFormatter())
    return bool(plotted)


def _finish(ax, title: str, ylabel: str, drawn: bool, *, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11, fontweight="bold")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    low, high = ax.get_xlim()
    if drawn and high - low < 3:  # one or two epochs: ticks at whole epochs, with room around the points and bars
        first, last = math.ceil(low), math.floor(high)
        ax.set_xticks(range(first, last + 1))
        ax.set_xlim(first - 0.75, last + 0.75)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _training_panels(axes: list, frame: pd.DataFrame, best: dict[str, Any] | None) -> None:
    loss, ppl, lr, grad, speed, gap = axes
    drawn = _plot_lines(loss, frame, {"train/loss": "train (epoch mean)", "val/loss": "validation"})
    if drawn and best is not None and isinstance(best.get("val/loss"), float):
        loss.scatter([best["epoch"]], [best["val/loss"]], marker="*", s=220, color="gold", edgecolor="black",
                     zorder=5, label=f"best (epoch {int(best['epoch'])})")  # fmt: skip
    _finish(loss, "Loss", "cross-entropy (nats/byte)", drawn)

    _finish(ppl, "Perplexity", "perplexity (log scale)",
            _plot_lines(ppl, frame, {"train/perplexity": "train", "val/perplexity": "validation"}, log=True))  # fmt: skip

    drawn = _plot_lines(lr, frame, {"learning_rate": "at epoch end"})
    if drawn:
        lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _finish(lr, "Learning rate (warmup + cosine)", "learning rate", drawn)

    drawn = _plot_lines(grad, frame, {"grad_norm": "mean over the epoch"})
    if drawn and "drift/grad_norm_var" in frame.columns:
        std = pd.to_numeric(frame["drift/grad_norm_var"], errors="coerce").clip(lower=0) ** 0.5
        mean = pd.to_numeric(frame["grad_norm"], errors="coerce")
        grad.fill_between(frame["epoch"], mean - std, mean + std, alpha=0.2, label="± 1 std within the epoch")
    _finish(grad, "Gradient norm (before clipping)", "L2 norm", drawn)

    unit = "tokens" if "tokens_per_second" in frame.columns else "samples"
    drawn = f"{unit}_per_second" in frame.columns
    if drawn:
        speed.bar(frame["epoch"], frame[f"{unit}_per_second"], color="tab:green", alpha=0.7, label=f"{unit} / second")
        if "epoch_seconds" in frame.columns:
            twin = speed.twinx()
            twin.plot(frame["epoch"], frame["epoch_seconds"], color="tab:red", marker="s", label="epoch time")
            twin.set_ylabel("epoch time (s)", color="tab:red")
            twin.set_ylim(0, 1.25 * max(float(frame["epoch_seconds"].max()), 1e-3))
            handles = speed.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            speed.legend(handles=handles, fontsize=8, loc="lower right")
    _finish(speed, "Throughput", f"{unit} / second", drawn, legend=not drawn or "epoch_seconds" not in frame.columns)

    drawn = {"train/loss", "val/loss"} <= set(frame.columns)
    if drawn:
        diff = pd.to_numeric(frame["val/loss"], errors="coerce") - pd.to_numeric(frame["train/loss"], errors="coerce")
        gap.bar(frame["epoch"], diff, color=["tab:red" if d > 0 else "tab:blue" for d in diff], alpha=0.7,
                label="val − train (red: val worse)")  # fmt: skip
        gap.axhline(0, color="black", linewidth=0.8)
    _finish(gap, "Generalization gap", "val loss − train loss", drawn)


def _drift_panels(axes: list, drift: pd.DataFrame) -> None:
    js, entropy, update, variance = axes
    _finish(js, "Drift · batch vs validation bytes", "Jensen-Shannon divergence (bits)",
            _plot_lines(js, drift, {"drift/token_js": "train batches ↔ validation"}))  # fmt: skip

    drawn = _plot_lines(entropy, drift, {"drift/probe_entropy": "mean entropy on a fixed probe"})
    if "drift/entropy_shift" in drift.columns:
        entropy.bar(drift["epoch"], drift["drift/entropy_shift"], alpha=0.35, color="tab:purple",
                    label="change since last epoch")  # fmt: skip
        drawn = True
    _finish(entropy, "Drift · prediction entropy", "entropy (nats)", drawn)

    groups = sorted(c for c in drift.columns if str(c).startswith("drift/update_ratio/"))
    drawn = _plot_lines(update, drift, {c: c.rsplit("/", 1)[-1] for c in groups}, log=True)
    _finish(update, "Drift · weight update ratio by layer group", "‖Δw‖ / ‖w‖ (log scale)", drawn)

    _finish(variance, "Drift · gradient-norm variance", "variance within the epoch",
            _plot_lines(variance, drift, {"drift/grad_norm_var": "per-step grad norm"}))  # fmt: skip


def dashboard_figure(results: dict[str, Any]):
    """The dashboard as a matplotlib Figure (no pyplot, no GUI backend): 6 panels of training
    curves, plus 4 drift panels when the run recorded drift."""
    from matplotlib.figure import Figure

    frame = metrics_frame(results)
    if frame.empty:
        raise NothingToAnalyse(
            f"run {results.get('run_name')!r} has no completed epoch yet; train at least one epoch, then plot"
        )
    drift = drift_frame(results)
    steps = steps_frame(results)
    extra = extra_panel_count(frame, steps)
    extra_rows = -(-extra // 3)
    best, _ = best_epoch_row(frame, "val/loss", "min")
    rows = 2 + (drift is not None) + extra_rows
    height = 4.5 * rows + 0.5
    fig = Figure(figsize=(17, height))
    # A fixed layout, not matplotlib's constrained one: that one gives up ("axes sizes collapsed to
    # zero", a warning in the cell) on some runs' tick labels, and a dashboard must look the same
    # every time. Margins in inches: the two-line title on top, the x labels below; each row is its
    # own grid, so the gaps (twin-axis labels included) are a share of a panel's width.
    outer = fig.add_gridspec(rows, 1, left=0.055, right=0.985, top=1 - 1.1 / height, bottom=0.5 / height, hspace=0.38)

    def row_axes(row: int, columns: int, count: int | None = None) -> list:
        cells = outer[row].subgridspec(1, columns, wspace=0.42)
        return [fig.add_subplot(cells[0, i]) for i in range(columns if count is None else count)]

    _training_panels(row_axes(0, 3) + row_axes(1, 3), frame, best)
    if drift is not None:
        _drift_panels(row_axes(2, 4), drift)
    first = 2 + (drift is not None)
    extra_axes = [ax for r in range(extra_rows) for ax in row_axes(first + r, 3, min(3, extra - 3 * r))]
    draw_extra_panels(extra_axes, frame, steps, _finish)

    config = results.get("config") or {}
    title = f"Run '{results.get('run_name')}': {len(frame)} epoch(s)"
    if best is not None and isinstance(best.get("val/loss"), float):
        title += f", best epoch {int(best['epoch'])} (val/loss {best['val/loss']:.4f})"
    details = [
        f"preset {config['preset']}" if "preset" in config else None,
        f"{config['n_layer']} layers × {config['n_embd']} dims" if {"n_layer", "n_embd"} <= set(config) else None,
        f"step {results['step']}" + (f" of {results['total_steps']}" if results.get("total_steps") else "")
        if "step" in results else None,
        "recovered from disk" if results.get("recovered") else "this session's training",
    ]  # fmt: skip
    fig.suptitle(title + "\n" + " · ".join(d for d in details if d), fontsize=14)
    return fig


def panel_count(results: dict[str, Any]) -> int:
    """How many epoch panels the dashboard of these results has: 6, or 10 with drift data (the
    per-step and task-metric panels below them are counted by `extra_panels`)."""
    return 10 if drift_frame(results) is not None else 6


def extra_panels(results: dict[str, Any]) -> int:
    """Panels beyond panel_count(): one per step-level series and one per task metric."""
    return extra_panel_count(metrics_frame(results), steps_frame(results))


def save_dashboard(results: dict[str, Any], output: str | Path | None = None) -> Path:
    """Render the dashboard with the Agg canvas (works headless) and save it as a PNG to
    `output` or `<workspace>/results/<run_name>_dashboard.png`; folders are created."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = dashboard_figure(results)
    FigureCanvasAgg(fig)
    return _write_atomically(Path(output or default_output(results, "dashboard.png")),
                             lambda tmp: fig.savefig(tmp, format="png", dpi=100))  # fmt: skip


# -- inference ----------------------------------------------------------------------------
def load_task_model(checkpoint_path: str | Path, *, build_task: Any = None, task_path: str | None = None):
    """(model, task) of one checkpoint of any task, on the CPU in eval mode; `task.sample_fn` is
    what Inference calls (None: this task has none). The builder recorded in the checkpoint is
    imported only when it is the one given (`build_task`/`task_path`) or the built-in byte LM;
    otherwise TaskMismatch names the recorded path. Hashes are verified first."""
    from .engine.checkpoint import load_checkpoint
    from .engine.reproducibility import seed_everything
    from .engine.task import DEFAULT_TASK_PATH, build_checked
    from .engine.trainer import TaskMismatch, resolve_builder

    loaded = load_checkpoint(Path(checkpoint_path), map_location="cpu")
    recorded = loaded.trainer_state.get("task") or DEFAULT_TASK_PATH
    if build_task is None and task_path is None and recorded != DEFAULT_TASK_PATH:
        raise TaskMismatch(loaded.path, recorded, "no task builder")
    builder, given = resolve_builder(build_task, task_path or (None if build_task else recorded))
    if given != recorded:
        raise TaskMismatch(loaded.path, recorded, given)
    config = TrainingConfig.from_dict(loaded.trainer_state.get("config") or {})
    seed_everything(config.seed)
    task = build_checked(builder, config, recorded)
    task.model.load_state_dict(loaded.model_state)
    return task.model.eval(), task
