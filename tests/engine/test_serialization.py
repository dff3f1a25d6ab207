"""The training-state file: safetensors + a JSON structure (format 3), the torch.save fallback,
format-2 checkpoints (training_state.pt) that still resume, and no process-wide torch setting touched."""

from __future__ import annotations

import io
import json
import math
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import utils.training.engine.commit as commit
from utils.training.engine.checkpoint import (
    LEGACY_STATE_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointManager,
    load_checkpoint,
    read_training_state,
)
from utils.training.engine.commit import MANIFEST_NAME, CheckpointCorrupt, new_hasher, read_manifest, write_manifest
from utils.training.engine.serialization import encode_training_state
from utils.training.engine.trainer import Trainer

try:
    from torch.utils.serialization import config as serialization_config
except ImportError:  # torch < 2.6: no switch to watch
    serialization_config = None


def _manager(run_dir: Path, *, async_save: bool) -> CheckpointManager:
    return CheckpointManager(
        run_dir, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min", async_save=async_save
    )


def _save(manager: CheckpointManager, step: int, training_state: dict[str, Any]) -> Path:
    manager.save(step, model_state={"w": torch.ones(3) * step}, training_state=training_state, trainer_state={})
    manager.wait_until_finished()
    assert manager.last_saved_path is not None
    return manager.last_saved_path


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert sorted(map(repr, a)) == sorted(map(repr, b))
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_every_kind_of_value_a_training_state_holds_round_trips_exactly(tmp_path: Path) -> None:
    optimizer_like = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5)}, 1: {"exp_avg": torch.randn(2)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "foreach": None, "params": [0, 1]}],
    }
    state = {
        "optimizer": optimizer_like,
        "python_rng": (3, tuple(range(2**31, 2**31 + 625)), None),
        "floats": [math.inf, -math.inf, math.nan, 0.1, -0.0],
        "keys": {1.5: "float key", None: "none key", True: "bool key", "s": b"bytes" == b"bytes"},
        "half": torch.randn(3, dtype=torch.bfloat16),
        "empty": torch.empty(0, 4),
        "view": torch.arange(100.0)[10:20:2],  # a strided view: only its own elements are written
        "numpy": np.arange(12, dtype=np.uint32).reshape(3, 4),
        "numpy_scalar": np.int64(7),
        "dtype": torch.float16,
        "nested": [[{"a": ()}], []],
    }
    path = _save(_manager(tmp_path, async_save=False), 1, state)
    assert (path / STATE_FILE).exists() and not (path / LEGACY_STATE_FILE).exists()
    tensors = load_file(str(path / STATE_FILE))  # a plain safetensors file: no pickle anywhere
    assert len(tensors) == 7  # four tensors of the optimizer and the top level, the view, the numpy array
    loaded = load_checkpoint(path).training_state
    state["view"] = state["view"].contiguous()
    _assert_same(loaded, state)


def test_sizes_and_devices_keep_their_types() -> None:
    from utils.training.engine.serialization import decode_structure

    state = {"size": torch.Size([2, 3]), "device": torch.device("cpu"), "dtype": torch.bfloat16}
    tensors, structure = encode_training_state(state)
    _assert_same(decode_structure(json.loads(structure), tensors), state)


def test_a_state_the_layout_cannot_hold_falls_back_to_torch_save_with_its_crc(tmp_path: Path) -> None:
    state = {"complex": torch.randn(4, dtype=torch.complex64), "step": 1}
    assert encode_training_state(state) is None
    path = _save(_manager(tmp_path, async_save=True), 1, state)
    assert (path / LEGACY_STATE_FILE).exists() and not (path / STATE_FILE).exists()
    assert set(read_manifest(path)["files"]) >= {LEGACY_STATE_FILE, MODEL_FILE}
    with zipfile.ZipFile(path / LEGACY_STATE_FILE) as archive:
        assert archive.testzip() is None  # every member's CRC32 is written and right
    _assert_same(load_checkpoint(path).training_state, state)


@pytest.mark.skipif(serialization_config is None, reason="this torch has no process-wide CRC switch")
@pytest.mark.parametrize("kind", ["safetensors", "torch.save fallback"])
def test_saving_in_the_background_changes_no_process_wide_torch_setting(tmp_path: Path, kind: str) -> None:
    """A torch.save elsewhere in the process while the writer thread saves must write its CRCs."""
    big = torch.randn(4_000_000)  # 16 MB: the writer is busy long enough to be watched
    state = {"big": big if kind == "safetensors" else torch.complex(big, big)}
    manager = _manager(tmp_path, async_save=True)
    seen, archives = set(), 0
    for step in (1, 2, 3):
        manager.save(step, model_state={"w": torch.ones(3)}, training_state=state, trainer_state={})
        while manager.in_flight():
            seen.add(serialization_config.save.compute_crc32)
            buffer = io.BytesIO()
            torch.save({"x": torch.arange(1000)}, buffer)
            with zipfile.ZipFile(buffer) as archive:
                assert archive.testzip() is None, "a zip written during a background save lacks its CRC32"
            archives += 1
        manager.wait_until_finished()
    assert seen == {True} and archives > 0


def test_a_structure_that_names_an_unknown_node_is_refused(tmp_path: Path) -> None:
    from utils.training.engine.commit import HashingWriter
    from utils.training.engine.serialization import STATE_FORMAT, STRUCTURE_KEY, write_safetensors

    path = tmp_path / STATE_FILE
    writer = HashingWriter(path)
    write_safetensors(writer, {"0": torch.ones(1)}, {"format": STATE_FORMAT, STRUCTURE_KEY: '{"eval": "0"}'})
    writer.close()
    with pytest.raises(CheckpointCorrupt, match=f"refused to load {STATE_FILE}"):
        read_training_state(path)


def _rewrite_as_format_2(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn a checkpoint into what the format-2 writer produced: the same state through torch.save
    into training_state.pt, and a version-2 manifest listing it."""
    state = read_training_state(folder / STATE_FILE)
    torch.save(state, folder / LEGACY_STATE_FILE)
    (folder / STATE_FILE).unlink()
    old = read_manifest(folder)
    files = {}
    for name in [n for n in old["files"] if n != STATE_FILE] + [LEGACY_STATE_FILE]:
        raw = (folder / name).read_bytes()
        hasher = new_hasher()
        hasher.update(raw)
        files[name] = {"size_bytes": len(raw), "hash": hasher.hexdigest()}
    kept = {k: v for k, v in old.items() if k not in ("format_version", "hash_algorithm", "created_at", "files")}
    kept.pop("manifest_hash", None)
    (folder / MANIFEST_NAME).unlink()
    with monkeypatch.context() as patch:
        patch.setattr(commit, "FORMAT_VERSION", 2)
        write_manifest(folder, files, **kept)
    assert read_manifest(folder)["format_version"] == 2


def test_a_format_2_checkpoint_resumes_bit_identical(
    trained_workspace: dict[str, Any], workspace_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = workspace_copy / "checkpoints" / trained_workspace["config"].run_name
    reference = tmp_path / "reference"
    shutil.copytree(run_dir / "step-000010", reference)
    for later in ("step-000006", "step-000009", "step-000010"):
        shutil.rmtree(run_dir / later)
    _rewrite_as_format_2(run_dir / "step-000005", monkeypatch)

    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    results = Trainer(config, progress=False).fit()
    assert results["completed"] and results["resume_count"] == 1
    resumed = run_dir / "step-000010"
    assert (resumed / STATE_FILE).exists()  # the continuation writes the current format
    old, new = load_checkpoint(reference), load_checkpoint(resumed)
    _assert_same(new.model_state, old.model_state)
    _assert_same(new.training_state["optimizer"], old.training_state["optimizer"])
    _assert_same(new.training_state["data"], old.training_state["data"])
