"""Resume after SIGKILL: each framework's run killed mid-epoch (just after its step-25 checkpoint of
40 steps, epochs of 20), resumed its own way, and its final weights compared with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
KILL_AFTER_STEP = 25


def _commands(framework: str, out: Path) -> tuple[list[str], Path, Path]:
    """(command, the file whose existence means the step-25 checkpoint exists, the final weights)."""
    if framework == "project":
        cmd = [sys.executable, "-m", "utils.training", "train", "--preset", "tiny", "--epochs", "2",
               "--steps-per-epoch", "20", "--save-every-steps", "5", "--save-every-seconds", "0", "--keep-last", "0",
               "--workspace", str(out), "--run-name", "crash"]  # fmt: skip
        run = out / "checkpoints" / "crash"
        return cmd, run / f"step-{KILL_AFTER_STEP:06d}", run / "step-000040" / "model.safetensors"
    cmd = [sys.executable, "-m", "benchmarks.peers.crash_train", framework, str(out)]
    # HF writes straight into checkpoint-N/ and trainer_state.json last; Lightning writes the .ckpt in place.
    marker = out / (
        f"checkpoint-{KILL_AFTER_STEP}/trainer_state.json" if framework == "hf" else f"step={KILL_AFTER_STEP}.ckpt"
    )
    return cmd, marker, out / "final.safetensors"


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[2:5]} failed: {done.stderr.decode()[-400:]}")


def crash_and_resume(framework: str, workdir: Path, after_seconds: float = 0.1) -> dict[str, Any]:
    """Kill `after_seconds` after the step-25 checkpoint's marker appears (so that a framework that
    writes in place has finished that save; a couple of steps later, still mid-epoch)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    reference, crashed = workdir / f"{framework}-reference", workdir / f"{framework}-crashed"
    cmd, _, final_ref = _commands(framework, reference)
    _run(cmd, env)
    cmd, marker, final = _commands(framework, crashed)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(after_seconds)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if final.exists():
        final.unlink()  # a run that finished before the kill proves nothing: reported as not killed
    _run(cmd + ([] if framework == "project" else ["--resume"]), env)
    ref, got = load_file(str(final_ref)), load_file(str(final))
    identical = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    return {"killed_mid_run": killed, "bit_identical": bool(identical),
            "max_abs_difference": max(float((ref[k] - got[k]).abs().max()) for k in ref)}  # fmt: skip


def bench_sigkill_resume(workdir: Path) -> dict[str, Any]:
    names = {"project": "training-survives", "hf": "HF Trainer (train(resume_from_checkpoint=True))",
             "lightning": "Lightning (fit(ckpt_path=newest), plain DataLoader)"}  # fmt: skip
    results = {}
    for framework, name in names.items():
        try:
            results[name] = crash_and_resume(framework, workdir)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            results[name] = {"error": str(exc)[:300]}
    return results
