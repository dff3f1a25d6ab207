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
    assert _sample(first).startswith("import ") and _sample(first) == _sample(second)


def test_a_tampered_checkpoint_is_refused(recovered_ns: dict[str, Any], capsys) -> None:
    weights = Path(recovered_ns["results"]["best_checkpoint_path"]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    inference.run(recovered_ns)
    out = capsys.readouterr().out
    assert "❌ Could not load" in out and "best_model" not in recovered_ns


def test_a_bad_length_is_reported(recovered_ns: dict[str, Any], capsys) -> None:
    inference.run(recovered_ns, max_new_tokens="lots")
    assert "max_new_tokens='lots' must be a whole number" in capsys.readouterr().out
