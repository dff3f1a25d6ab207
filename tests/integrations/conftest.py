"""Shared framework runs for the integration tests: one Hugging Face and one Lightning run per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from frameworks import fit_lightning, run_hf_child


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted, sealed Hugging Face run (12 steps, checkpoints 9 and 12 kept). Read-only."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    output_dir, weights = root / "out", root / "final.safetensors"
    proc = run_hf_child(output_dir, weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"output_dir": output_dir, "weights": weights}


@pytest.fixture(scope="session")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sealed Lightning run of 8 steps (2 epochs of 4): checkpoints at steps 2, 4, 6, 8. Read-only."""
    pytest.importorskip("lightning")
    root = tmp_path_factory.mktemp("lightning") / "run"
    fit_lightning(root, max_steps=8)
    return root
