"""The Inference cell: loading the best weights safely, a reproducible sample, and refused checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.training.cells import inference


def _sample(out: str) -> str:
    return out.split(inference.SAMPLE_START + "\n", 1)[1].split("\n" + inference.SAMPLE_END, 1)[0]


def test_without_results_it_names_what_is_missing(capsys) -> None:
    inference.run({})
    assert "Inference cell needs `results`" in capsys.readouterr().out


def test_after_recovery_it_loads_the_best_weights_and_samples_reproducibly(
    recovered_ns: dict[str, Any], capsys
) -> None:
    capsys.readouterr()
    inference.run(recovered_ns, prompt="import ", max_new_tokens=40, seed=3)
    first = capsys.readouterr().out
    inference.run(recovered_ns, prompt="import ", max_new_tokens=40, seed=3)
    second = capsys.readouterr().out
    assert "hashes verified" in first and recovered_ns["best_model"].training is False
    assert _sample(first).strip() and _sample(first) == _sample(second)  # the byte LM's sample_fn, seeded


def test_a_tampered_checkpoint_is_refused_and_the_best_that_verifies_is_used(
    recovered_ns: dict[str, Any], capsys
) -> None:
    weights = Path(recovered_ns["results"]["best_checkpoint_path"]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    inference.run(recovered_ns)
    out = capsys.readouterr().out
    assert "failed its integrity check" in out and "step-000010" in out
    assert "✅ Loaded" in out and "step-000005" in out and inference.SAMPLE_START in out


def test_nothing_that_verifies_is_said_not_loaded(recovered_ns: dict[str, Any], capsys) -> None:
    run_dir = Path(recovered_ns["results"]["best_checkpoint_path"]).parent
    for weights in run_dir.glob("step-*/model.safetensors"):
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    inference.run(recovered_ns)
    out = capsys.readouterr().out
    assert "❌ No checkpoint of run 'r' passes the full integrity check" in out and "best_model" not in recovered_ns


def test_a_bad_length_is_reported(recovered_ns: dict[str, Any], capsys) -> None:
    inference.run(recovered_ns, max_new_tokens="lots")
    assert "max_new_tokens='lots' must be a whole number" in capsys.readouterr().out


def _tiny_task(config):
    """A task of a user's: a linear classifier on fixed random data, with no sample function."""
    import torch
    from torch.utils.data import TensorDataset

    from utils.training import Task

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,), generator=generator)
    return Task(
        model=torch.nn.Linear(4, 2),
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x[:8], y[:8]),
        loss_fn=lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
    )


def test_a_task_without_a_sample_function_says_so_and_keeps_the_weights(make_config, tmp_path: Path, capsys) -> None:
    from utils.training.cells import recovery
    from utils.training.engine.trainer import Trainer

    config = make_config(tmp_path / "ws", epochs=1, steps_per_epoch=0, batch_size=8, eval_batches=0)
    Trainer(config, build_task=_tiny_task, task_path="notebook:build_task", progress=False).fit()
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(tmp_path / "ws"))
    capsys.readouterr()
    inference.run(ns)  # the Model cell not run in this kernel: the recorded builder is not importable
    out = capsys.readouterr().out
    assert "trained with the task builder 'notebook:build_task'" in out and "Model cell" in out
    assert "best_model" not in ns
    ns["build_task"] = _tiny_task  # the Model cell run again
    inference.run(ns)
    out = capsys.readouterr().out
    assert "✅ Loaded 10 parameters" in out and "has no sample function (Task.sample_fn)" in out
    assert ns["best_model"].weight.shape == (2, 4) and inference.SAMPLE_START not in out
    ns["db"].close()
