"""Recovery scan in a fresh process: find the newest checkpoint and read the run's history, no
weights, as each framework's user would; interleaved rounds, page cache warm."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median

REPO_ROOT = Path(__file__).resolve().parents[2]

HF_SCAN = (
    "import json, sys; from transformers.trainer_utils import get_last_checkpoint; "
    "p = get_last_checkpoint(sys.argv[1]); json.load(open(p + '/trainer_state.json'))"
)
LIGHTNING_SCAN = (
    "import sys, pathlib, pandas, lightning.pytorch; root = pathlib.Path(sys.argv[1]); "
    "newest = max(root.glob('*.ckpt'), key=lambda p: p.stat().st_mtime); pandas.read_csv(root / 'metrics.csv')"
)


def bench_recovery_scan(project_workspace: Path, hf_dir: Path, lightning_dir: Path, repeats: int) -> dict[str, Any]:
    (lightning_dir / "metrics.csv").write_text("epoch,step,train_loss\n" + "".join(f"0,{i},1.0\n" for i in range(50)))
    commands = {
        "training-survives recover --json": [
            sys.executable, "-m", "utils.training", "recover", "--checkpoint-dir", str(project_workspace), "--json",
        ],
        "HF get_last_checkpoint + trainer_state.json": [sys.executable, "-c", HF_SCAN, str(hf_dir)],
        "Lightning newest .ckpt + metrics.csv (pandas)": [sys.executable, "-c", LIGHTNING_SCAN, str(lightning_dir)],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    names = list(commands)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up: page cache
        _run(commands[name], env)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_run(commands[name], env))
    return {name: {"seconds": median(v), "min": min(v), "max": max(v)} for name, v in times.items()}


def _run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, timeout=300, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command[1:3]} failed: {done.stderr.decode()[-400:]}")
    return seconds
