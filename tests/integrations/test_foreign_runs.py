"""Hugging Face and Lightning runs read back from disk: recover(), `recover --json`, the Recovery and Dashboard cells."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from utils.training.cells import dashboard, inference, recovery
from utils.training.engine.foreign_runs import load_hint
from utils.training.engine.recovery import recover

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRAINING_"):
            monkeypatch.delenv(name)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_hf_output_dir_gives_the_results_dict(hf_run: dict[str, Path]) -> None:
    out = hf_run["output_dir"]
    results = recover(out, search_dirs=[])
    assert results["source"] == "huggingface" and results["run_id"] is None
    assert results["checkpoint_path"] == str(out / "checkpoint-12")
    assert results["step"] == 12 and results["total_steps"] == 12 and results["completed"] is True
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [e for e in state["log_history"] if "loss" in e]
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    # Step rows from the loss entries, epoch rows from the eval entries (eval every 6 steps).
    assert [r["step"] for r in results["step_history"]] == [e["step"] for e in losses] == list(range(1, 13))
    assert [r["train/loss"] for r in results["step_history"]] == [e["loss"] for e in losses]
    history = results["metrics_history"]
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 6), (2, 12)]
    assert [r["val/loss"] for r in history] == [e["eval_loss"] for e in evals]
    assert math.isclose(history[1]["train/loss"], sum(e["loss"] for e in losses[6:]) / 6)
    assert results["best_epoch"] == min(history, key=lambda r: r["val/loss"])["epoch"]
    assert results["config"]["run_name"] == "out"
    assert "from_pretrained" in load_hint(results) and load_hint({"source": "training-survives"}) is None
    assert results["framework_config"]["model_config"]["n_embd"] == 16  # from config.json, never a pickle


def test_hf_recovery_skips_an_unfinished_save(hf_run: dict[str, Path], tmp_path: Path) -> None:
    out = _copy(hf_run["output_dir"], tmp_path)
    (out / "checkpoint-12" / "MANIFEST.json").unlink()
    results = recover(out, search_dirs=[])
    assert results["checkpoint_path"] == str(out / "checkpoint-9") and results["step"] == 9
    assert [r["step"] for r in results["step_history"]][-1] == 9
    assert results["skipped"] == [{"path": str(out / "checkpoint-12"), "reason": results["skipped"][0]["reason"]}]
    assert "not sealed" in results["skipped"][0]["reason"]
    # Pointing at one checkpoint folder works too.
    assert recover(out / "checkpoint-9", search_dirs=[])["run_dir"] == str(out)


def test_lightning_folder_gives_the_results_dict(lightning_run: Path) -> None:
    results = recover(lightning_run, search_dirs=[])
    assert results["source"] == "lightning" and results["run_id"] is None
    assert results["checkpoint_path"] == str(lightning_run / "checkpoints" / "epoch=1-step=8.ckpt")
    assert results["step"] == 8
    history = results["metrics_history"]
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 4), (2, 8)]
    assert all({"train/loss", "val/loss"} <= set(r) for r in history)
    assert [r["step"] for r in results["step_history"]] == list(range(1, 9))


def test_lightning_dirpath_or_unsealed_run(lightning_run: Path, tmp_path: Path) -> None:
    run = _copy(lightning_run, tmp_path)
    results = recover(run / "checkpoints", search_dirs=[])  # the dirpath itself: logs found beside it
    assert results["step"] == 8 and len(results["metrics_history"]) == 2
    for seal in (run / "checkpoints").glob("*.manifest.json"):
        seal.unlink()  # as if trained without SealCheckpoints
    results = recover(run, search_dirs=[])
    assert results["sealed"] is False and results["checkpoint_path"].endswith("epoch=1-step=8.ckpt")
    assert results["step"] == 8 and results["skipped"] == []


@pytest.mark.parametrize("which", ["hf", "lightning"])
def test_recover_cli_json(which: str, hf_run: dict[str, Path], lightning_run: Path) -> None:
    folder = hf_run["output_dir"] if which == "hf" else lightning_run
    proc = subprocess.run(
        [sys.executable, "-m", "utils.training", "recover", "--checkpoint-dir", str(folder), "--json"],
        capture_output=True, text=True, cwd=str(REPO), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results["source"] == {"hf": "huggingface", "lightning": "lightning"}[which]
    assert results["run_id"] is None and len(results["metrics_history"]) == 2


def test_reading_foreign_runs_imports_no_torch(hf_run: dict[str, Path], lightning_run: Path) -> None:
    code = (
        "import sys; from utils.training.engine.foreign_runs import detect, read_foreign_run\n"
        f"for p in ({str(hf_run['output_dir'])!r}, {str(lightning_run)!r}):\n"
        "    assert read_foreign_run(*detect(p))['metrics_history']\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("which", ["hf", "lightning"])
def test_recovery_dashboard_and_inference_cells(which: str, hf_run: dict[str, Path], lightning_run: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    folder = _copy(hf_run["output_dir"] if which == "hf" else lightning_run, tmp_path)
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(folder))
    out = capsys.readouterr().out
    assert "✅ Recovered run" in out, out
    try:
        assert ns["results"]["source"] == {"hf": "huggingface", "lightning": "lightning"}[which]
        assert list(ns["metrics_df"]["epoch"]) == [1, 2]
        assert {"train/loss", "val/loss"} <= set(ns["metrics_df"].columns)
        assert ns["training_config"].run_name == folder.name and ns["workspace_root"] == str(folder)
        dashboard.run(ns, show=False)
        assert "Dashboard of run" in capsys.readouterr().out
        assert Path(ns["dashboard_path"]).stat().st_size > 10_000
        inference.run(ns)  # it names the framework's own loader instead of failing on a foreign checkpoint
        out = capsys.readouterr().out
        assert "❌" not in out and "best_model" not in ns, out
        assert ("from_pretrained" if which == "hf" else "load_from_checkpoint") in out
        assert ns["results"]["checkpoint_path"] in out or str(ns["results"]["best_checkpoint_path"]) in out
    finally:
        ns["db"].close()
