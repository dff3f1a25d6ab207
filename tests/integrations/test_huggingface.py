"""Hugging Face Trainer: SealCheckpoints seals every checkpoint-N/, and a run SIGKILLed anywhere resumes exactly."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from frameworks import HF_CHILD, REPO, run_hf_child  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from utils.training.engine.commit import hash_file  # noqa: E402
from utils.training.engine.recovery import recover  # noqa: E402
from utils.training.integrations.huggingface import (  # noqa: E402
    SaveLimitTooLow,
    SealCheckpoints,
    newest_valid_checkpoint,
)

KILL_PHASES = ("model", "optimizer", "rng", "seal")  # inside HF's save (three moments), inside our seal


def _same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(bool((left[k] == right[k]).all()) for k in left)


def _copy(hf_run: dict[str, Path], tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(hf_run["output_dir"], target)
    return target


def test_every_checkpoint_is_sealed_with_sizes_and_hashes(hf_run: dict[str, Path]) -> None:
    out = hf_run["output_dir"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-9"]  # limit 2
    for folder in out.glob("checkpoint-*"):
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert manifest["global_step"] == int(folder.name.split("-")[1])
        on_disk = {p.name for p in folder.iterdir()} - {"MANIFEST.json"}
        assert set(manifest["files"]) == on_disk
        for name, entry in manifest["files"].items():
            assert hash_file(folder / name) == entry
    assert newest_valid_checkpoint(out) == str(out / "checkpoint-12")


def test_damaged_and_unsealed_checkpoints_are_skipped_with_a_reason(
    hf_run: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _copy(hf_run, tmp_path)
    weights = out / "checkpoint-12" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert newest_valid_checkpoint(out) == str(out / "checkpoint-9")
    assert any("checkpoint-12" in r.getMessage() and "hash" in r.getMessage() for r in caplog.records)

    (out / "checkpoint-9" / "MANIFEST.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert newest_valid_checkpoint(out) is None
    assert any("checkpoint-9" in r.getMessage() and "not sealed" in r.getMessage() for r in caplog.records)


def test_a_file_the_seal_does_not_list_disqualifies_the_checkpoint(hf_run: dict[str, Path], tmp_path: Path) -> None:
    out = _copy(hf_run, tmp_path)
    (out / "checkpoint-12" / "scaler.pt").write_bytes(b"planted")  # HF would load it on resume
    assert newest_valid_checkpoint(out) == str(out / "checkpoint-9")


def test_save_total_limit_below_two_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    args = TrainingArguments(output_dir=str(tmp_path), save_total_limit=1, report_to=[], use_cpu=True)
    with pytest.raises(SaveLimitTooLow, match="save_total_limit=1") as info:
        Trainer(model=model, args=args, callbacks=[SealCheckpoints()])
    assert "at least 2" in info.value.fix


def _kill_on_a_timer(output_dir: Path, weights: Path, delay: float) -> tuple[int, str]:
    """Start the sealed run, SIGKILL it `delay` seconds after it starts training; (status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HF_CHILD), str(output_dir), str(weights), "--step-sleep", "0.08"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith("READY"):
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        status = proc.wait(timeout=120)
        return status, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_killed_at_random_moments_resumes_to_the_same_final_weights(hf_run: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(13)
    out, weights = tmp_path / "out", tmp_path / "final.safetensors"
    # Two kills inside a save (a random moment of HF's writes or of our seal) at random saves,
    # then one at a random time from outside, then the run is let finish.
    kills = sorted((rng.choice((3, 6, 9)), rng.choice(KILL_PHASES)) for _ in range(2))
    for step, phase in kills:
        proc = run_hf_child(out, weights, "--kill-at", f"{step}:{phase}")
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert (out / f"checkpoint-{step}").is_dir()
        assert not (out / f"checkpoint-{step}" / "MANIFEST.json").exists()  # killed before the seal
    unfinished = out / f"checkpoint-{kills[-1][0]}"
    _, stderr = _kill_on_a_timer(out, weights, delay=rng.uniform(0.0, 1.0))
    assert f"skipped {unfinished}: not sealed" in stderr  # the next start named the unfinished save
    final = run_hf_child(out, weights)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _same_weights(weights, hf_run["weights"])
    assert newest_valid_checkpoint(out) == str(out / "checkpoint-12")
    assert list((out / "abandoned").glob("*/checkpoint-*"))  # the interrupted saves were kept, set aside


@pytest.mark.slow
def test_without_the_callback_a_kill_inside_the_save_breaks_the_resume(tmp_path: Path) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    out, weights = tmp_path / "out", tmp_path / "final.safetensors"
    killed = run_hf_child(out, weights, "--no-seal", "--kill-at", "6:rng")
    assert killed.returncode == -signal.SIGKILL
    broken = out / "checkpoint-6"
    assert (broken / "model.safetensors").exists() and not (broken / "trainer_state.json").exists()
    assert get_last_checkpoint(str(out)) == str(broken)  # HF's own lookup takes the broken folder
    resumed = run_hf_child(out, weights, "--no-seal", "--resume", "hf-last")
    assert resumed.returncode != 0
    assert "FileNotFoundError" in resumed.stderr and "trainer_state.json" in resumed.stderr
    assert not weights.exists()
    # Our lookup passes over the same folder (unsealed) instead of failing.
    assert newest_valid_checkpoint(out) is None
    # Recovery still reads such a run, from its newest readable trainer state, and says it is unsealed.
    results = recover(out, search_dirs=[])
    assert results["checkpoint_path"] == str(out / "checkpoint-3") and results["sealed"] is False
    assert [s["path"] for s in results["skipped"]] == [str(broken)]
    assert "trainer_state.json is missing" in results["skipped"][0]["reason"]
