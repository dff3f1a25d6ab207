"""Command line: python -m utils.training {train,recover,verify,dashboard,export}."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from .config import PRESETS, ConfigError, TrainingConfig, read_config_file

EXIT_FAILURE = 1
DEFAULT_TASK = "utils.training.engine.lm_task:build_task"  # the byte LM: presets size it
TASK_PRESET_FIELDS = ("learning_rate", "warmup_steps")  # what a preset still sets under --task
EXIT_USAGE = 2


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null so any JSON parser reads the output."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def print_json(data: Any) -> None:
    print(json.dumps(_finite(data), indent=2, default=_json_default))


def build_config(args: argparse.Namespace) -> TrainingConfig:
    """Preset, then the --config file, then the flags: each overrides the one before."""
    from_file = read_config_file(args.config) if args.config else {}
    preset = args.preset or from_file.get("preset") or "tiny"
    if preset not in PRESETS:
        raise ConfigError(f"config field preset={preset!r} is invalid: allowed one of {sorted(PRESETS)}")
    base = dict(PRESETS[preset])
    if getattr(args, "task", None) not in (None, DEFAULT_TASK):
        # A preset sizes the byte LM: for another task it changes no model or data field, and an
        # epoch is one full pass over the data unless --steps-per-epoch caps it.
        base = {k: v for k, v in base.items() if k in TASK_PRESET_FIELDS}
        base.update(steps_per_epoch=0, eval_batches=0)
    overrides = {
        "workspace_root": args.workspace,
        "run_name": args.run_name,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "seed": args.seed,
        "corpus": args.corpus,
        "save_every_steps": args.save_every_steps,
        "save_every_seconds": args.save_every_seconds,
        "keep_last": args.keep_last,
        "keep_best": args.keep_best,
        "device": args.device,
        "async_save": {"async": True, "sync": False}.get(args.save_mode),
        "on_save_error": args.on_save_error,
        "distributed_strategy": args.strategy,
        "accept_config_change": True if getattr(args, "accept_config_change", False) else None,
        "tensorboard": args.tensorboard,
        "batch_size": getattr(args, "batch_size", None),
        "log_every_steps": getattr(args, "log_every_steps", None),
    }
    flags = {k: v for k, v in overrides.items() if v is not None}
    return TrainingConfig.from_dict({**base, **from_file, "preset": preset, **flags})


def summary_lines(results: dict[str, Any]) -> list[str]:
    history = results.get("metrics_history") or []
    last = history[-1] if history else {}
    lines = [
        f"run {results['run_name']} (id {results.get('run_id')}): {len(history)} epoch(s), step {results.get('step')}"
        + (f" of {results['total_steps']}" if results.get("total_steps") else ""),
        f"  checkpoint: {results['checkpoint_path']}",
        f"  best:       {results['best_checkpoint_path']} (epoch {results.get('best_epoch')})",
    ]
    if last:
        shown = [f"{k} {v:.4f}" for k, v in last.items() if k.startswith(("train/", "val/")) and isinstance(v, float)]
        lines.append("  last epoch: " + "  ".join(shown))
    for item in results.get("skipped") or []:
        lines.append(f"  skipped {item['path']}: {item['reason']}")
    return lines


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.trainer import TaskMismatch, Trainer

    config = build_config(args)
    trainer = Trainer(config, task_path=args.task, resume=args.resume, progress=not args.json and sys.stderr.isatty())
    try:
        results = trainer.fit()
    except TaskMismatch as exc:
        raise CliError(
            f"{exc.checkpoint} was trained with --task {exc.recorded}; run the same command with "
            f"--task {exc.recorded}, or use a new --run-name"
        ) from exc
    finally:
        trainer.runtime.close()
    if not trainer.runtime.is_main:
        return 0
    if args.json:
        print_json(results)
    else:
        for message in results.get("messages", []):
            print(_cli_words(message), file=sys.stderr)
        print("\n".join(summary_lines(results)))
    if results.get("status") == "interrupted":
        print("training stopped by a signal; a checkpoint was saved, run the same command to resume", file=sys.stderr)
        return 130
    return 0


def recover_for(args: argparse.Namespace) -> dict:
    """--checkpoint-dir DIR: that folder only; without it, the newest run across the default locations."""
    from .engine.recovery import DEFAULT_SEARCH_DIRS, recover
    from .engine.run_search import recover_newest

    if args.checkpoint_dir:
        return recover(args.checkpoint_dir, search_dirs=[], run_name=args.run_name)
    return recover_newest(DEFAULT_SEARCH_DIRS, run_name=args.run_name)


def cmd_recover(args: argparse.Namespace) -> int:
    if args.checkpoint_dir and not Path(args.checkpoint_dir).exists():
        raise CliError(f"--checkpoint-dir {args.checkpoint_dir} does not exist; pass the folder that holds the run")
    results = recover_for(args)
    if args.json:
        print_json(results)
    else:
        print("\n".join(summary_lines(results)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .engine.checkpoint import STEP_DIR, TRAINER_FILE, list_checkpoints
    from .engine.commit import MANIFEST_NAME, CheckpointCorrupt, unlisted_files, verify

    root = Path(args.path)
    if not root.exists():
        raise CliError(f"{root} does not exist; pass a checkpoint folder or a tree that holds checkpoints")
    looks_like_one = (
        STEP_DIR.match(root.name) or (root / TRAINER_FILE).exists() or (root / "model.safetensors").exists()
    )
    if (root / MANIFEST_NAME).exists() or looks_like_one:
        targets = [root]  # a checkpoint folder without MANIFEST.json fails below, naming it
    else:
        targets = []
        for folder, dirnames, _ in os.walk(root, followlinks=False):
            targets += [path for _, path in list_checkpoints(Path(folder))]
            # abandoned/ holds what rollbacks set aside (damaged ones included): not part of any run
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "step-")) and d != "abandoned"]
    if not targets:
        raise CliError(f"no checkpoint (step-NNNNNN folder) under {root}")
    report = []
    for path in sorted(targets):
        try:
            manifest = verify(path)
            unlisted = unlisted_files(path, manifest)
            report.append({"path": str(path), "ok": True, "files": len(manifest["files"]), "unlisted": unlisted})
        except CheckpointCorrupt as exc:
            report.append({"path": str(path), "ok": False, "reason": exc.reason, "file": exc.path})
    bad = [r for r in report if not r["ok"]]
    if args.json:
        print_json({"checked": len(report), "failed": len(bad), "checkpoints": report})
    else:
        for r in report:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['path']}" + ("" if r["ok"] else f": {r['reason']}"))
            for name in r.get("unlisted", []):
                print(
                    f"warn {r['path']}: {name} is not listed in the manifest (never loaded; not part of the checkpoint)"
                )
    if bad:
        print(f"error: {len(bad)} of {len(report)} checkpoint(s) failed verification; first: {bad[0]['file']}: "
              f"{bad[0]['reason']}", file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .analysis import save_dashboard

    results = recover_for(args)
    path = save_dashboard(results, args.output)
    print_json({"dashboard": str(path)}) if args.json else print(f"dashboard written to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .analysis import export_metrics_csv, export_steps_csv

    results = recover_for(args)
    if getattr(args, "mlflow", None) is not None:
        return _export_mlflow(results, args)
    path, rows = export_metrics_csv(results, args.output)
    steps = export_steps_csv(results, Path(path).with_name(Path(path).name.replace("metrics", "steps"))
                             if args.output and "metrics" in Path(args.output).name else None)  # fmt: skip
    if args.json:
        print_json({"csv": str(path), "rows": rows, "steps_csv": str(steps[0]) if steps else None,
                    "step_rows": steps[1] if steps else 0})  # fmt: skip
    else:
        print(f"{rows} row(s) written to {path}")
        if steps:
            print(f"{steps[1]} step row(s) written to {steps[0]}")
    return 0


def _export_mlflow(results: dict[str, Any], args: argparse.Namespace) -> int:
    from .integrations.mlflow_export import MlflowUnavailable, export_run

    try:
        report = export_run(results, args.mlflow or None)
    except MlflowUnavailable as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print_json(report)
    else:
        print(f"run {results['run_name']} -> MLflow run {report['mlflow_run_id']} at {report['tracking_uri']}: "
              f"{report['metrics_logged']} metric value(s) logged, {report['metrics_already_there']} already there")  # fmt: skip
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run, resuming it when it has a checkpoint")
    t.add_argument("--task", help="module:function building the Task to train (default: the byte LM)")
    t.add_argument("--preset", choices=sorted(PRESETS))
    t.add_argument("--config", help="a JSON file written by TrainingConfig.to_json()")
    t.add_argument("--workspace", help="workspace root (default ./training_output)")
    t.add_argument("--run-name")
    t.add_argument("--epochs", type=int)
    t.add_argument("--steps-per-epoch", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--batch-size", type=int, help="samples per step (per process under torchrun)")
    t.add_argument("--log-every-steps", type=int, help="a steps.jsonl line every N steps (0 = none)")
    t.add_argument("--corpus", help="a text file or a folder of text files (default: Python's stdlib source)")
    t.add_argument("--save-every-steps", type=int)
    t.add_argument("--save-every-seconds", type=float)
    t.add_argument("--keep-last", type=int)
    t.add_argument("--keep-best", type=int)
    t.add_argument(
        "--resume",
        default="auto",
        help="auto (continue the newest checkpoint that verifies) | never (start fresh; refused while a "
        "checkpoint verifies, damaged ones are set aside) | PATH to a step-NNNNNN folder of the run "
        "(a rollback: newer checkpoints move to abandoned/)",
    )
    t.add_argument(
        "--accept-config-change",
        action="store_true",
        help="resume even though the batch size, schedule, optimizer settings or data changed (recorded in run.json)",
    )
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    t.add_argument("--save-mode", choices=["async", "sync"])
    t.add_argument("--on-save-error", choices=["stop", "continue"])
    t.add_argument("--strategy", choices=["ddp", "fsdp"], help="data parallelism under torchrun (default ddp)")
    t.add_argument("--tensorboard", action="store_true", default=None,
                   help="log step and epoch metrics to <workspace>/tensorboard/<run> (needs tensorboard)")  # fmt: skip
    t.add_argument("--json", action="store_true", help="print the results dict as JSON on stdout")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("recover", help="rebuild the results dict of the newest run from disk")
    r.add_argument("--checkpoint-dir", help="look here only (a workspace, checkpoints/, a run or a step folder)")
    r.add_argument("--run-name")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recover)

    v = sub.add_parser("verify", help="check every file hash of one checkpoint or of every checkpoint in a tree")
    v.add_argument("path")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    for name, func, what in (
        ("dashboard", cmd_dashboard, "the dashboard PNG"),
        ("export", cmd_export, "the metrics CSV"),
    ):
        p = sub.add_parser(name, help=f"write {what} of a run into <workspace>/results/")
        p.add_argument("--checkpoint-dir", help="where the run is (default: the default locations)")
        p.add_argument("--run-name")
        p.add_argument("--output", help="file to write (default <workspace>/results/<run_name>_...)")
        p.add_argument("--json", action="store_true")
        if name == "export":
            p.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                           help="log the run to MLflow instead (default URI sqlite:///<workspace>/mlflow.db)")  # fmt: skip
        p.set_defaults(func=func)
    return parser


# The engine names settings, not flags (the notebook shares it); here each fix is phrased as this
# command's flags. Longest first where one phrase contains another.
CLI_WORDS = (
    ("accept the change on purpose with accept_config_change", "add --accept-config-change to accept it"),
    ("set them aside and start over with resume=never", "set them aside with --resume never"),
    ("continue it with resume=auto", "continue it with --resume auto"),
    ("resume=never was given", "--resume never was given"),
    ("set resume to auto, never or a step-NNNNNN folder", "pass --resume auto, never or a step-NNNNNN folder"),
    ("start the same training again to resume", "run the same command to resume"),
    ("use a new run name", "use a new --run-name"),
    ("set corpus to", "point --corpus at"),
)


def _cli_words(exc: BaseException | str) -> str:
    """The engine's message, with its fixes phrased as this command's flags."""
    text = str(exc)
    for engine, cli in CLI_WORDS:
        text = text.replace(engine, cli)
    return text


# Failures a user can act on: printed as one line. Named by module so that a subcommand imports
# only what it needs (`recover` must not import torch): a class whose module was never imported
# cannot have been raised.
_USER_ERRORS = (
    ("engine.commit", "CheckpointError"),
    ("engine.data", "CorpusError"),
    ("engine.devices", "DeviceError"),
    ("engine.exactness", "ConfigChanged"),
    ("engine.experiment_db", "ExperimentDBError"),
    ("engine.runlock", "RunLocked"),
    ("engine.resume", "ResumeError"),
    ("engine.task", "TaskError"),
)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (CliError, ConfigError)):
        return True
    for module_name, class_name in _USER_ERRORS:
        cls = getattr(sys.modules.get(f"{__package__}.{module_name}"), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _current_folder_on_path() -> None:
    """`--task mytask:build` finds ./mytask.py (engine.task.task_module_path, without importing torch)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: list[str] | None = None) -> int:
    _current_folder_on_path()
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line instead of a traceback; TRAINING_DEBUG=1 shows it
        if _is_user_error(exc):
            print(f"error: {_cli_words(exc)}", file=sys.stderr)
            return EXIT_FAILURE
        if os.environ.get("TRAINING_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (set TRAINING_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
