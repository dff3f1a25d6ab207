"""The Best model cell: the best epoch, the fallback to the last one, and the checkpoint check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from utils.training.cells import best_model


def test_without_results_it_names_what_is_missing(capsys) -> None:
    best_model.run({})
    assert "Best model cell needs `results`" in capsys.readouterr().out


def test_the_best_epoch_is_the_lowest_validation_loss_and_its_checkpoint_verifies(
    recovered_ns: dict[str, Any], capsys
) -> None:
    history = recovered_ns["results"]["metrics_history"]
    expected = min(history, key=lambda r: r["val/loss"])["epoch"]
    best_model.run(recovered_ns)
    out = capsys.readouterr().out
    assert recovered_ns["best_epoch"] == expected and f"Best epoch: {expected} of 2 (lowest val/loss)" in out
    assert "every hash verified" in out
    assert recovered_ns["best_checkpoint_path"] == recovered_ns["results"]["best_checkpoint_path"]
    assert "gradient norm" in out and "drift: token JS divergence" in out  # optional metrics, present here


def test_optional_metrics_are_shown_only_when_present(recovered_ns: dict[str, Any], capsys) -> None:
    recovered_ns["metrics_df"] = recovered_ns["metrics_df"][["epoch", "train/loss", "val/loss", "val/perplexity"]]
    capsys.readouterr()
    best_model.run(recovered_ns)
    out = capsys.readouterr().out
    assert "gradient norm" not in out and "throughput" not in out and "val/perplexity" in out


def test_without_a_validation_loss_it_falls_back_to_the_last_epoch_and_says_so(
    recovered_ns: dict[str, Any], capsys
) -> None:
    recovered_ns["metrics_df"]["val/loss"] = math.nan
    best_model.run(recovered_ns)
    out = capsys.readouterr().out
    assert "showing the last epoch (2) instead" in out and recovered_ns["best_epoch"] == 2


def test_only_results_is_enough(recovered_ns: dict[str, Any], capsys) -> None:
    ns = {"results": recovered_ns["results"]}
    best_model.run(ns)
    out = capsys.readouterr().out
    assert "metrics_df is missing: using the metrics in `results`" in out and "every hash verified" in out


def _flip_last_byte(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the full hash check can tell
    weights.write_bytes(bytes(data))


def test_a_damaged_best_checkpoint_is_passed_over_for_the_best_that_verifies(
    recovered_ns: dict[str, Any], capsys
) -> None:
    best = Path(recovered_ns["results"]["best_checkpoint_path"])
    assert best.name == "step-000010"  # epoch 2 of the shared run
    _flip_last_byte(best)
    best_model.run(recovered_ns)
    out = capsys.readouterr().out
    assert "Passed over" in out and "step-000010" in out
    assert "Using" in out and "step-000005" in out and "every hash verified" in out
    assert recovered_ns["best_checkpoint_path"].endswith("step-000005")  # epoch 1's, the next best by val/loss


def test_a_deleted_best_checkpoint_is_reported_and_another_used(recovered_ns: dict[str, Any], capsys) -> None:
    import shutil

    shutil.rmtree(recovered_ns["results"]["best_checkpoint_path"])
    best_model.run(recovered_ns)
    out = capsys.readouterr().out
    assert "is gone" in out and recovered_ns["best_checkpoint_path"].endswith("step-000005")


def test_every_checkpoint_damaged_is_said_once_with_what_to_do(recovered_ns: dict[str, Any], capsys) -> None:
    run_dir = Path(recovered_ns["results"]["best_checkpoint_path"]).parent
    for checkpoint in run_dir.glob("step-*"):
        _flip_last_byte(checkpoint)
    best_model.run(recovered_ns)
    out = capsys.readouterr().out
    assert "❌ No checkpoint of run 'r' passes the full integrity check" in out and "start a new run" in out
    assert "Recovery cell" not in out and "best_checkpoint_path" not in recovered_ns
