"""The shipped examples, each trained end to end through the real command line, SIGKILLed once
mid-run and resumed with the same command, ending bit-identical to an uninterrupted run: the
byte LM (a Task like any other), the digits classifier, the Hugging Face causal LM."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.training import TrainingConfig
from utils.training.engine.checkpoint import MODEL_FILE, list_checkpoints, read_model_file
from utils.training.engine.metrics_log import METRICS_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TIMING = {"epoch_seconds", "samples_per_second", "tokens_per_second", "time"}
# The README's example commands, run as written plus the flags below (later flags win): smaller
# data and a checkpoint every step, so that the kill lands mid-run.
EXAMPLES = {
    "byte-lm": ("utils.training.engine.lm_task:build_task", ["--epochs", "2", "--steps-per-epoch", "10"], 20, None),
    "digits": ("examples.digits:build_task", ["--config", "{digits}"], 8, "sklearn"),
    "hf-causal-lm": ("examples.hf_causal_lm:build_task", ["--epochs", "2", "--steps-per-epoch", "8", "--batch-size",
                     "4", "--corpus", "README.md", "--config", "{hf}"], 16, "transformers"),
}  # fmt: skip
CONFIGS = {
    "digits": {"task_options": {"hidden": 32, "train_samples": 256}},
    "hf": {"task_options": {"n_embd": 32, "n_layer": 1}, "eval_batches": 2},
}


def readme_command(task: str) -> list[str]:
    """The README's command line for `task` (its examples section), or the bare train command."""
    block = re.search(r"<!-- readme-test: examples -->\n```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(),
                      re.DOTALL)  # fmt: skip
    for line in block.group(1).splitlines():
        if f"--task {task} " in line:
            return shlex.split(line)[1:]
    return ["-m", "utils.training", "train", "--task", task]


def command(task: str, workspace: Path, extra: list[str], config_dir: Path) -> list[str]:
    extra = [a.format(**{k: str(config_dir / f"{k}.json") for k in CONFIGS}) for a in extra]
    return [sys.executable, *readme_command(task), "--workspace", str(workspace), "--run-name", "ex",
            "--save-every-steps", "1", "--keep-last", "3", "--device", "cpu", "--json", *extra]  # fmt: skip


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return found[0][0] if found else 0


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def train_killed_and_resumed(name: str, tmp_path: Path) -> tuple[Path, dict]:
    """Run the example twice side by side; SIGKILL one after its first checkpoints, resume it,
    check it ends bit-identical; return its run folder and results."""
    task, extra, total, needs = EXAMPLES[name]
    if needs:
        pytest.importorskip(needs)
    for key, settings in CONFIGS.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(settings))
    reference_cmd = command(task, tmp_path / "reference", extra, tmp_path)
    reference = subprocess.Popen(reference_cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed_cmd = command(task, tmp_path / "killed", extra, tmp_path)
    run_dir = tmp_path / "killed" / "checkpoints" / "ex"
    victim = subprocess.Popen(killed_cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while newest_step(run_dir) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    code = victim.wait(timeout=60)
    assert code == -signal.SIGKILL, f"the run ended on its own before the kill (exit {code}): {victim.stderr.read()}"
    victim.stderr.close()
    assert 0 < newest_step(run_dir) < total
    resumed = subprocess.run(killed_cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    results = json.loads(resumed.stdout)
    assert results["resume_count"] == 1 and results["step"] == total and results["task"] == task
    assert name == "byte-lm" or readme_command(task)[-1] != task, "the README has no command for this example"

    final = f"step-{total:06d}"
    weights = read_model_file(run_dir / final / MODEL_FILE)
    expected = read_model_file(tmp_path / "reference" / "checkpoints" / "ex" / final / MODEL_FILE)
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert value.equal(weights[key]), f"{name}: {key} differs after SIGKILL + resume"
    assert rows(run_dir) == rows(tmp_path / "reference" / "checkpoints" / "ex")
    return run_dir, results


@pytest.mark.slow
def test_byte_lm_example(tmp_path: Path) -> None:
    _, results = train_killed_and_resumed("byte-lm", tmp_path)
    assert {"val/perplexity", "tokens_per_second", "drift/token_js"} <= set(results["metrics_history"][-1])


@pytest.mark.slow
def test_digits_example(tmp_path: Path) -> None:
    _, results = train_killed_and_resumed("digits", tmp_path)
    last = results["metrics_history"][-1]
    assert 0.0 <= last["val/accuracy"] <= 1.0 and "train/accuracy" in last
    assert "val/perplexity" not in last


@pytest.mark.slow
def test_hf_causal_lm_example_exports_its_best_checkpoint(tmp_path: Path) -> None:
    run_dir, results = train_killed_and_resumed("hf-causal-lm", tmp_path)
    from transformers import GPT2LMHeadModel

    from examples.hf_causal_lm import export_pretrained, make_model

    config = TrainingConfig.from_dict(results["config"])
    exported = export_pretrained(results["best_checkpoint_path"], tmp_path / "pretrained", config)
    loaded = GPT2LMHeadModel.from_pretrained(exported).eval()
    ours = make_model(config).eval()
    ours.load_state_dict(read_model_file(Path(results["best_checkpoint_path"]) / MODEL_FILE))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert "val/perplexity" in results["metrics_history"][-1]
