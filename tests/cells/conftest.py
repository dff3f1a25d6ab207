"""Fixtures for the cell tests: a clean environment, a private working folder, and namespaces
(plain dicts) as the Training and Recovery cells leave them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from utils.training.cells import recovery, training


@pytest.fixture(autouse=True)
def clean_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No TRAINING_* overrides, and a working folder of its own, so the default search
    places (./training_output, ./tmp_training_output) are this test's, not the repository's."""
    for name in list(os.environ):
        if name.startswith("TRAINING_"):
            monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def recovered_ns(workspace_copy: Path) -> dict[str, Any]:
    """A namespace after the Recovery cell, pointed at a private copy of the shared run."""
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(workspace_copy))
    assert "results" in ns, "the Recovery cell did not recover the shared run"
    yield ns
    ns["db"].close()


@pytest.fixture
def train_ns(make_config: Callable[..., Any], tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Run the Training cell on a fresh tiny run; returns the namespace it left."""
    opened: list[dict[str, Any]] = []

    def train(ns: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        ns = {} if ns is None else ns
        ns.setdefault("planned_config", make_config(tmp_path / "trained", **overrides))
        training.run(ns, progress=False)
        opened.append(ns)
        return ns

    yield train
    for ns in opened:
        if ns.get("db") is not None:
            ns["db"].close()
