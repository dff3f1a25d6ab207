"""The notebook namespace: which names a cell needs, the check that reports them, and publishing them.

The contract (DESIGN.md): after the Training or the Recovery cell the namespace holds the
required names `results`, `metrics_df`, `workspace_root`, `training_config`, `config`, and
the optional `drift_data`, `model`, `db`, `run_id`.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

NEXT_FOR_RESULTS = "run the Recovery cell (after a disconnect) or the Training cell first, then re-run this cell"
REQUIRED_NAMES = ("results", "metrics_df", "workspace_root", "training_config", "config")
OPTIONAL_NAMES = ("drift_data", "model", "db", "run_id")
COLAB_WORKSPACE = "/content/workspace"  # wiped when Colab recycles the VM
DRIVE_MOUNT = "/content/drive"
DRIVE_WORKSPACE = "/content/drive/MyDrive/training_workspace"  # survives a recycled VM
LOCAL_WORKSPACE = "training_output"  # outside Colab with no workspace chosen: runs here resume
SCRATCH_WORKSPACE = "tmp_training_output"  # cleared by the Training cell only with TRAINING_FRESH_START=1
# The latest run-choosing action in this kernel ("parameters", "training" or "recovery"): the Training
# cell follows it (DESIGN.md, "Which run": the latest action wins).
RUN_ACTION = "run_action"
TRAINED_RUN = "trained_run_dir"  # the run folder the Training cell last trained in this kernel


class _PrintHandler(logging.Handler):
    """Library log records as text lines on the cell's stdout (looked up at emit time: the kernel swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        mark = "⚠️ " if record.levelno >= logging.WARNING else ""
        print(f"{mark}{notebook_words(record.getMessage())}")


def text_output(cell: Callable[..., Any]) -> Callable[..., Any]:
    """Run a cell function so that what it warns or logs is printed as text on stdout.

    A notebook shows anything on stderr in red, and the notebook tests count it as a failure; a
    warning raised while a cell works (matplotlib, pandas, the config's notes) is information, so it
    is printed like the rest of the cell's messages, once per cell run.
    """

    @functools.wraps(cell)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        library_log = logging.getLogger("utils.training")
        handler = _PrintHandler(logging.WARNING)
        library_log.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                result = cell(*args, **kwargs)
        finally:
            library_log.removeHandler(handler)
        seen: set[str] = set()
        for warning in caught:
            text = f"⚠️ {warning.category.__name__}: {warning.message}"
            if text not in seen:
                seen.add(text)
                print(text)
        return result

    return wrapper


def _is_results(value: Any) -> bool:
    return isinstance(value, dict) and "run_name" in value and "metrics_history" in value


def _is_frame(value: Any) -> bool:
    return hasattr(value, "columns") and hasattr(value, "iloc")


def _is_config(value: Any) -> bool:
    return hasattr(value, "run_name") and hasattr(value, "checkpoint_dir")


# What a usable value of each name looks like, and how to say what is wrong with another.
VALIDATORS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "results": (_is_results, "the results dict (with run_name and metrics_history)"),
    "metrics_df": (_is_frame, "a pandas DataFrame"),
    "workspace_root": (lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", "a folder path"),
    "training_config": (_is_config, "a TrainingConfig (attribute access: .run_name, .checkpoint_dir)"),
    "config": (_is_config, "a TrainingConfig (alias of training_config)"),
}


def problem(ns: dict[str, Any], name: str) -> str | None:
    """Why `name` is not usable in `ns` (missing, None, or the wrong kind), or None when it is."""
    if name not in ns:
        return "not defined"
    value = ns[name]
    if value is None:
        return "is None"
    check, expected = VALIDATORS.get(name, (lambda v: True, ""))
    if not check(value):
        return f"is a {type(value).__name__}, not {expected}"
    return None


def check(ns: dict[str, Any], required: Iterable[str], *, cell: str, next_step: str = NEXT_FOR_RESULTS) -> bool:
    """True when every required name is usable; otherwise print what is missing and what to run."""
    missing = [(name, why) for name in required if (why := problem(ns, name)) is not None]
    if not missing:
        return True
    listed = ", ".join(f"`{name}` ({why})" for name, why in missing)
    print(f"❌ The {cell} cell needs {listed}.")
    print(f"   Next: {next_step}.")
    return False


def env_value(name: str) -> str | None:
    """The value of a TRAINING_* override, or None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def show_path(path: str | os.PathLike | None) -> str:
    """A path as the user would type it: relative to the working folder when it is inside it."""
    if path is None:
        return "(none)"
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def close_db(ns: dict[str, Any]) -> None:
    """Close the ExperimentDB a previous cell left in the namespace before replacing it."""
    db = ns.get("db")
    close = getattr(db, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # an already-closed or foreign object: nothing to release
            pass


def publish(ns: dict[str, Any], results: dict[str, Any], config: Any, *, db: Any, run_id: Any, model: Any) -> None:
    """Set every name of the contract from one results dict (training and recovery both call this)."""
    from ..analysis import metrics_frame

    ns["results"] = results
    ns["metrics_df"] = metrics_frame(results)
    ns["workspace_root"] = str(results.get("workspace_root") or config.workspace_root)
    ns["training_config"] = config
    ns["config"] = config
    ns["drift_data"] = results.get("drift_history") or None
    ns["db"] = db
    ns["run_id"] = run_id
    if model is None:
        ns.pop("model", None)  # a model from another run would be wrong; Inference loads weights from disk
    else:
        ns["model"] = model


# The engine names settings, not flags (the command line shares it, and words its fixes as flags); in a
# cell the same fix is a form field. Longest first where one phrase contains another.
NOTEBOOK_WORDS = (
    ("start the same training again to resume", "re-run the Training cell to continue"),
    ("set them aside and start over with resume=never", "start a new run (Parameters cell, resume)"),
    ("continue it with resume=auto", "continue it (Parameters cell: resume = continue)"),
    ("resume=never was given", "a fresh start was asked for"),
    (
        "set resume to auto, never or a step-NNNNNN folder",
        "set resume (Parameters cell) to continue, start a new run or a checkpoint folder",
    ),
    ("use a new run name", "use a new run_name (Parameters cell)"),
    ("set corpus to", "set data_path (Parameters cell) to"),
    ("raise epochs", "raise epochs (Parameters cell)"),
)


def notebook_words(text: str) -> str:
    """An engine message with its fixes phrased as the form fields and cells that do them."""
    for cli, cell in NOTEBOOK_WORDS:
        text = text.replace(cli, cell)
    return text
