"""Runs that Hugging Face Trainer or PyTorch Lightning wrote, read into the results dict from metadata only.

A Hugging Face `output_dir` (`checkpoint-N/trainer_state.json`, whose `log_history` gives the
step rows from its `loss` entries and the epoch rows from its `eval_loss` entries) and a
Lightning log folder (`metrics.csv` from CSVLogger, `.ckpt` files) give the same results dict
as a run of ours, with `source` naming the framework and `run_id` None. Configs come from JSON
only (`config.json`), never from `training_args.bin` or a checkpoint: those are pickles.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .commit import MANIFEST_NAME, CheckpointCorrupt, CheckpointError, read_json, read_small_file, subfolders
from .foreign_seals import (
    CKPT_SUFFIX,
    HF_CHECKPOINT,
    SEAL_SUFFIX,
    check_hf_checkpoint,
    check_lightning_checkpoint,
    hf_checkpoints,
    lightning_checkpoints,
    scan_lightning_checkpoints,
)

SOURCE_OURS = "training-survives"
SOURCE_HF = "huggingface"
SOURCE_LIGHTNING = "lightning"
HF_STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"  # a run folder of ours
OUR_STEP_DIR = re.compile(r"^step-\d{6,}$")
LIGHTNING_METRICS = "metrics.csv"
MAX_STEP_ROWS = 5000
_EVAL_TIMINGS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


class NoForeignCheckpoint(CheckpointError):
    """A Hugging Face or Lightning run folder holds no checkpoint that can be read."""


def detect(path: str | os.PathLike) -> tuple[str, Path] | None:
    """(source, run folder) when `path` is a Hugging Face output_dir (or one of its
    `checkpoint-N` folders) or a Lightning log folder; None for anything else (ours included)."""
    path = Path(path)
    if not path.is_dir() or _looks_like_ours(path):
        return None
    if HF_CHECKPOINT.match(path.name) and (path / HF_STATE_FILE).exists():
        return SOURCE_HF, path.parent
    if hf_checkpoints(path):
        return SOURCE_HF, path
    if _lightning_checkpoint_dirs(path):
        return SOURCE_LIGHTNING, path
    return None


def load_hint(results: dict[str, Any]) -> str | None:
    """For a Hugging Face or Lightning run, how to load its weights with its own framework (the
    notebook's Best model and Inference cells build only tasks of ours); None for our own runs."""
    path = results.get("best_checkpoint_path") or results.get("checkpoint_path")
    if results.get("source") == SOURCE_HF:
        return (
            f"this is a Hugging Face run: load its weights with transformers, e.g. "
            f"AutoModelForCausalLM.from_pretrained({str(path)!r}) (safetensors; its seal is checked by "
            "newest_valid_checkpoint)"
        )
    if results.get("source") == SOURCE_LIGHTNING:
        return (
            f"this is a Lightning run: load it with YourModule.load_from_checkpoint({str(path)!r}, "
            "weights_only=True), after newest_valid_checkpoint has checked its seal (Lightning checkpoints are pickles)"
        )
    return None


def _looks_like_ours(path: Path) -> bool:
    """A workspace, checkpoints/ folder, run folder or step folder of ours (cheap: no deep walk)."""
    if (path / MANIFEST_NAME).exists() and not HF_CHECKPOINT.match(path.name):
        return True
    return any((p / RUN_FILE).is_file() or OUR_STEP_DIR.match(p.name) for p in _near(path))


def _near(path: Path) -> Iterator[Path]:
    """`path`, its subfolders, then those of its checkpoints/ (each listed only when reached)."""
    yield path
    yield from subfolders(path)
    yield from subfolders(path / "checkpoints")


def read_foreign_run(source: str, run_dir: str | os.PathLike, *, recovered: bool = True) -> dict[str, Any]:
    """The results dict of a Hugging Face or Lightning run folder. Raises NoForeignCheckpoint."""
    reader = {SOURCE_HF: _hf_results, SOURCE_LIGHTNING: _lightning_results}[source]
    results = reader(Path(run_dir))
    results["recovered"] = recovered
    return results


def _run_name(folder: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", folder.resolve().name).lstrip(".")[:128]
    return name or "run"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _thin(rows: list[dict[str, Any]], limit: int = MAX_STEP_ROWS) -> list[dict[str, Any]]:
    """Past `limit` rows, a uniform stride that keeps the last one (as for our steps.jsonl)."""
    if len(rows) <= limit:
        return rows
    stride = math.ceil(len(rows) / limit)
    kept = rows[::-1][::stride][::-1]
    return kept


def _best(metrics_history: list[dict[str, Any]]) -> int | None:
    scored = [r for r in metrics_history if _number(r.get("val/loss")) is not None]
    if not scored:
        return metrics_history[-1]["epoch"] if metrics_history else None
    return min(scored, key=lambda r: r["val/loss"])["epoch"]


def _base_results(source: str, run_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    name = _run_name(run_dir)
    return {
        "source": source,
        "run_name": name,
        "run_id": None,
        "workspace_root": str(run_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "run_dir": str(run_dir),
        # A config our TrainingConfig reads (the notebook builds training_config from it);
        # the framework's own settings are in framework_config.
        "config": {"run_name": name, "workspace_root": str(run_dir)},
        "best": None,
        "monitor_metric": "val/loss",
        "drift_history": [],
        "resume_count": 0,
    }


# -- Hugging Face ----------------------------------------------------------------------------
def _hf_step_row(entry: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"step": int(entry["step"]), "epoch": _number(entry.get("epoch"))}
    for key, value in entry.items():
        number = _number(value)
        if number is None or key in ("step", "epoch"):
            continue
        if key == "loss":
            row["train/loss"] = number
        elif key in ("learning_rate", "grad_norm"):
            row[key] = number
        else:
            row[f"train/{key}"] = number
    return row


def _hf_epoch_rows(log_history: list[Any], step_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    evals = [e for e in log_history if isinstance(e, dict) and _number(e.get("eval_loss")) is not None]
    evals = [e for e in evals if isinstance(e.get("step"), int)]
    if not evals:  # no validation: one row per whole epoch, from the step rows
        ends: dict[int, int] = {}
        for row in step_rows:
            if row["epoch"] is not None:
                ends[max(1, math.ceil(row["epoch"] - 1e-9))] = row["step"]
        evals = [{"step": step, "epoch": float(epoch)} for epoch, step in sorted(ends.items())]
    rows, previous = [], -1
    for number, entry in enumerate(sorted(evals, key=lambda e: e["step"]), start=1):
        row: dict[str, Any] = {"epoch": number, "step": entry["step"], "framework_epoch": _number(entry.get("epoch"))}
        for key, value in entry.items():
            if key.startswith("eval_") and key not in _EVAL_TIMINGS and _number(value) is not None:
                row[f"val/{key[len('eval_') :]}"] = _number(value)
        window = [r for r in step_rows if previous < r["step"] <= entry["step"]]
        losses = [r["train/loss"] for r in window if "train/loss" in r]
        if losses:
            row["train/loss"] = sum(losses) / len(losses)
        for key in ("learning_rate", "grad_norm"):
            values = [r[key] for r in window if key in r]
            if values:
                row[key] = values[-1] if key == "learning_rate" else sum(values) / len(values)
        rows.append(row)
        previous = entry["step"]
    return rows


def _read_hf_state(folder: Path) -> dict[str, Any]:
    state = read_json(folder / HF_STATE_FILE, HF_STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointCorrupt(folder / HF_STATE_FILE, "is not a Hugging Face trainer state (no global_step)")
    if not isinstance(state.get("log_history", []), list):
        raise CheckpointCorrupt(folder / HF_STATE_FILE, "log_history is not a list")
    return state


def _hf_newest(output_dir: Path, skipped: list[dict[str, str]]) -> tuple[Path, dict[str, Any], bool]:
    """(checkpoint, its trainer state, sealed). In a run that seals its checkpoints, the newest
    whose seal passes the cheap check; in a run with no seal at all (trained without
    SealCheckpoints), the newest whose trainer_state.json reads. Passed-over ones go to `skipped`."""
    checkpoints = [folder for _, folder in hf_checkpoints(output_dir)]
    sealed_run = any((folder / MANIFEST_NAME).exists() for folder in checkpoints)
    for folder in checkpoints:
        try:
            if sealed_run:
                check_hf_checkpoint(folder, full=False)
            return folder, _read_hf_state(folder), sealed_run
        except CheckpointCorrupt as exc:
            skipped.append({"path": str(folder), "reason": exc.reason})
    raise NoForeignCheckpoint(
        output_dir,
        "no readable Hugging Face checkpoint (checkpoint-N with a sealed or readable trainer_state.json)",
        "point at the output_dir of a run that saved at least one checkpoint",
    )


def _hf_results(output_dir: Path) -> dict[str, Any]:
    skipped: list[dict[str, str]] = []
    checkpoint, state, sealed = _hf_newest(output_dir, skipped)
    step = state["global_step"]
    history = [e for e in state.get("log_history", []) if isinstance(e, dict) and isinstance(e.get("step"), int)]
    step_rows = [_hf_step_row(e) for e in history if _number(e.get("loss")) is not None and e["step"] <= step]
    metrics_history = [r for r in _hf_epoch_rows(history, step_rows) if r["step"] <= step]
    model_config: Any = {}
    try:
        model_config = read_json(checkpoint / "config.json", "config.json")
    except CheckpointCorrupt:
        pass  # a model without a config.json (not a PreTrainedModel): nothing to show
    best = checkpoint
    recorded = state.get("best_model_checkpoint")
    if isinstance(recorded, str) and re.match(r"^checkpoint-\d+$", Path(recorded).name):
        candidate = output_dir / Path(recorded).name
        try:
            if sealed:
                check_hf_checkpoint(candidate, full=False)
            elif not candidate.is_dir():
                raise CheckpointCorrupt(candidate, "missing")
            best = candidate
        except CheckpointCorrupt:
            pass  # the recorded best is gone or damaged: the newest stands in
    max_steps = state.get("max_steps")
    results = _base_results(SOURCE_HF, output_dir, output_dir)
    keys = ("max_steps", "num_train_epochs", "train_batch_size", "logging_steps", "eval_steps", "save_steps")
    results.update(
        checkpoint_path=str(checkpoint),
        best_checkpoint_path=str(best),
        sealed=sealed,
        framework_config={"trainer_state": {k: state.get(k) for k in keys}, "model_config": model_config},
        metrics_history=metrics_history,
        best_epoch=_best(metrics_history),
        skipped=skipped,
        step=step,
        epoch=int(math.floor((_number(state.get("epoch")) or 0.0) + 1e-9)),
        total_steps=max_steps if isinstance(max_steps, int) else None,
        completed=isinstance(max_steps, int) and step >= max_steps > 0,
        step_history=_thin(step_rows),
    )
    return results


# -- Lightning -----------------------------------------------------------------------------------
def _lightning_checkpoint_dirs(root: Path) -> list[Path]:
    """The folders that hold `.ckpt` files or their seals: root, its subfolders, and the
    `checkpoints/` folders of Lightning's default layout (`lightning_logs/version_N/checkpoints`)."""
    candidates = dict.fromkeys([root, *subfolders(root), *root.glob("*/*/checkpoints")])
    suffixes = (CKPT_SUFFIX, CKPT_SUFFIX + SEAL_SUFFIX)
    return [
        folder
        for folder in candidates
        if folder.is_dir()
        and not folder.name.startswith(".")
        and any(p.name.endswith(suffixes) for p in _entries(folder))
    ]


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _lightning_name(column: str) -> str:
    base = re.sub(r"_(step|epoch)$", "", column)
    if base in ("loss", "train_loss", "train/loss"):
        return "train/loss"
    if base in ("val_loss", "valid_loss", "validation_loss", "val/loss"):
        return "val/loss"
    if base in ("lr", "learning_rate") or base.startswith("lr-"):
        return "learning_rate"
    for prefix, ours in (("train_", "train/"), ("val_", "val/")):
        if base.startswith(prefix):
            return ours + base[len(prefix) :]
    return base


def _read_metrics_csv(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(epoch rows, step rows) of a CSVLogger metrics.csv. A row with a validation metric or a
    column ending in `_epoch` belongs to its epoch. Lightning counts epochs from 0 and logs
    `step` as the optimizer steps finished before the one being logged; we count epochs from 1
    and steps as finished ones (a checkpoint's global_step), so both get + 1."""
    text = read_small_file(path, LIGHTNING_METRICS).decode("utf-8", errors="replace")
    by_epoch: dict[int, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    for record in csv.DictReader(io.StringIO(text)):
        values = {}
        for column, raw in record.items():
            try:
                values[column] = float(raw) if raw not in (None, "") else None
            except (TypeError, ValueError):
                values[column] = None
        step, epoch = values.pop("step", None), values.pop("epoch", None)
        if step is None or epoch is None:
            continue
        step += 1
        metrics = {c: v for c, v in values.items() if v is not None and math.isfinite(v)}
        epoch_level = any(c.endswith("_epoch") or _lightning_name(c).startswith("val/") for c in metrics)
        if epoch_level:
            row = by_epoch.setdefault(int(epoch) + 1, {"epoch": int(epoch) + 1})
            row["step"] = max(int(step), row.get("step", 0))
            row.update({_lightning_name(c): v for c, v in metrics.items()})
        elif metrics:
            steps.append({"step": int(step), "epoch": epoch, **{_lightning_name(c): v for c, v in metrics.items()}})
    return [by_epoch[e] for e in sorted(by_epoch)], steps


def _newest_metrics_csv(root: Path) -> Path | None:
    found = [p for depth in range(4) for p in root.glob("/".join(["*"] * depth + [LIGHTNING_METRICS]))]
    found = [p for p in found if p.is_file() and not p.is_symlink()]
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))) if found else None


def _lightning_newest(root: Path, skipped: list[dict[str, str]]) -> tuple[Path, int | None, bool]:
    best: tuple[int, str, Path] | None = None
    for folder in _lightning_checkpoint_dirs(root):
        ckpt, step, passed = scan_lightning_checkpoints(folder, full=False)
        skipped += passed
        if ckpt is not None and (best is None or (step, ckpt.name) > best[:2]):
            best = (step, ckpt.name, ckpt)
    if best is not None:
        return best[2], best[0], True
    files = [c for folder in _lightning_checkpoint_dirs(root) for c in lightning_checkpoints(folder)]
    unsealed = [c for c in files if not c.with_name(c.name + SEAL_SUFFIX).exists()]
    if unsealed and len(unsealed) == len(files):  # trained without SealCheckpoints: the newest, metadata only
        newest = max(unsealed, key=lambda p: (p.stat().st_mtime, p.name))
        skipped[:] = [s for s in skipped if s["path"] not in {str(c) for c in unsealed}]
        match = re.search(r"step=(\d+)", newest.name)
        return newest, int(match.group(1)) if match else None, False
    raise NoForeignCheckpoint(
        root,
        "no readable Lightning checkpoint (.ckpt) in this folder or below it",
        "point at the folder that holds the run's ModelCheckpoint dirpath and its CSVLogger logs",
    )


def _lightning_results(root: Path) -> dict[str, Any]:
    skipped: list[dict[str, str]] = []
    checkpoint, step, sealed = _lightning_newest(root, skipped)
    epoch_rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    metrics_csv = _newest_metrics_csv(root)
    if metrics_csv is None and checkpoint.parent == root:  # pointed at the dirpath: logs are beside it
        metrics_csv = _newest_metrics_csv(root.parent)
    if metrics_csv is not None:
        try:
            epoch_rows, step_rows = _read_metrics_csv(metrics_csv)
        except CheckpointCorrupt as exc:
            skipped.append({"path": exc.path, "reason": exc.reason})
    if step is not None:  # rows past the checkpoint belong to a future the checkpoint does not hold
        epoch_rows = [r for r in epoch_rows if r["step"] <= step]
        step_rows = [r for r in step_rows if r["step"] <= step]
    results = _base_results(SOURCE_LIGHTNING, root, checkpoint.parent)
    if sealed:
        check_lightning_checkpoint(checkpoint, full=False)
    results.update(
        checkpoint_path=str(checkpoint),
        best_checkpoint_path=str(checkpoint),
        sealed=sealed,
        framework_config={"metrics_csv": str(metrics_csv) if metrics_csv else None},
        metrics_history=epoch_rows,
        best_epoch=_best(epoch_rows),
        skipped=skipped,
        step=step if step is not None else (step_rows[-1]["step"] if step_rows else 0),
        epoch=epoch_rows[-1]["epoch"] if epoch_rows else 0,
        total_steps=None,
        completed=False,
        step_history=_thin(step_rows),
    )
    return results
