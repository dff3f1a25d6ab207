"""`python -m benchmarks.peers [--state-mib 252] [--json]`: the peer tables (markdown on stdout, JSON with --json)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    parser.add_argument("--state-mib", type=float, default=252, help="weights + AdamW moments (default 252)")
    parser.add_argument("--width", type=int, default=1024, help="width of the Linear layers")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of each measurement")
    parser.add_argument("--loop-steps", type=int, default=10, help="training steps of one loop segment")
    parser.add_argument("--saves", type=int, default=1, help="async saves in one loop segment")
    parser.add_argument("--skip-crash", action="store_true", help="leave out the SIGKILL resume runs (slow)")
    parser.add_argument("--json", action="store_true", help="print the JSON results instead of the tables")
    args = parser.parse_args(argv)
    try:
        import lightning  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        parser.error(f"{exc.name} is not installed: install the peers extra (pip install -e '.[peers]') first")
    torch.set_num_threads(1)
    results = run_peers(args)
    print(json.dumps(results, indent=1) if args.json else tables(results))
    return 0


def run_peers(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.recovery import train_every_step_run

    from .crash import bench_sigkill_resume
    from .damage import bench_truncated_newest
    from .saves import bench_async_loss, bench_durable_saves
    from .scan import bench_recovery_scan

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        root = Path(tmp)
        results: dict[str, Any] = {
            "durable_save": bench_durable_saves(root / "durable", args.state_mib, args.width, args.repeats),
            "async_loop_loss": bench_async_loss(
                root / "async", args.state_mib, args.width, args.loop_steps, args.saves, args.repeats, 32
            ),
            "truncated_newest": bench_truncated_newest(root / "damage", min(args.state_mib, 16), args.width),
        }
        if not args.skip_crash:
            results["sigkill_resume"] = bench_sigkill_resume(root / "crash")
        workspace = root / "project-run"
        train_every_step_run(workspace, 4)
        results["recovery_scan"] = bench_recovery_scan(
            workspace, root / "damage" / "huggingface", root / "damage" / "lightning", args.repeats
        )
    results["meta"] = {
        "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:]),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "versions": _versions(), "seconds": round(time.perf_counter() - started, 1),
        "state_mib": args.state_mib, "repeats": args.repeats,
    }  # fmt: skip
    return results


def _versions() -> dict[str, str]:
    import accelerate
    import lightning
    import transformers

    return {"lightning": lightning.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}  # fmt: skip


def tables(results: dict[str, Any]) -> str:
    durable = results["durable_save"]
    lines = [f"Durable save, {durable['state_mib']:.0f} MiB Linear + AdamW state, median of {durable['repeats']}:", "",
             "| framework | durable save (s) | min – max | of which fsync we added (s) | bytes |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in durable["frameworks"].items():
        lines.append(f"| {name} | {row['durable_seconds']:.3f} | {row['min']:.3f} – {row['max']:.3f} | "
                     f"{row['added_fsync_seconds']:.3f} | {row['bytes']:,} |")  # fmt: skip
    loss = results["async_loop_loss"]
    lines += ["", f"Loop time lost per async save ({loss['saves']} save{'s' if loss['saves'] != 1 else ''} in {loss['steps']} steps, median of "
              f"{loss['repeats']}; project sync save {loss['project_sync_save_seconds']:.3f} s):", "",
              "| framework | lost per save (s) | min – max | / project sync save |", "|---|---:|---:|---:|"]  # fmt: skip
    for name, row in loss["frameworks"].items():
        lines.append(f"| {name} | {row['lost_seconds_per_save']:.3f} | {row['min']:.3f} – {row['max']:.3f} | "
                     f"{row['vs_project_sync_save']:.2f} |")  # fmt: skip
    lines += ["", "Newest checkpoint truncated (largest file cut in half), then each framework's resume path:", "",
              "| framework | file cut | what happens |", "|---|---|---|"]  # fmt: skip
    for name, row in results["truncated_newest"].items():
        what = f"resumed from {row['from']}" if row["outcome"] == "resumed" else f"error: `{row['error']}`"
        lines.append(f"| {name} | {row['truncated_file']} | {what} |")
    lines += ["", "Resume after SIGKILL mid-epoch (40 steps, epochs of 20, killed just after the step-25 save), "
              "final weights against an uninterrupted run:", "",
              "| framework | killed mid-run | bit-identical | max abs difference |", "|---|:---:|:---:|---:|"]  # fmt: skip
    for name, row in results.get("sigkill_resume", {}).items():
        if "error" in row:
            lines.append(f"| {name} | | | error: `{row['error'][:120]}` |")
        else:
            lines.append(f"| {name} | {'yes' if row['killed_mid_run'] else 'no'} | "
                         f"{'yes' if row['bit_identical'] else 'NO'} | {row['max_abs_difference']:.3g} |")  # fmt: skip
    lines += ["", "Recovery scan in a fresh process (newest checkpoint + history, no weights):", "",
              "| command | seconds | min – max |", "|---|---:|---:|"]  # fmt: skip
    for name, row in results["recovery_scan"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['min']:.2f} – {row['max']:.2f} |")
    meta = results["meta"]
    lines += ["", f"`{meta['command']}`: torch {meta['torch']}, {meta['versions']}, {meta['seconds']} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
