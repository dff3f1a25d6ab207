"""The checkpoint index: recovery ranks from it without reading every manifest, and exactly as a full read does."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.training.engine.checkpoint import CheckpointManager
from utils.training.engine.checkpoint_index import INDEX_FILE, ranked_checkpoints, refresh_index, step_dir_name
from utils.training.engine.commit import MANIFEST_NAME
from utils.training.engine.recovery import recover
from utils.training.engine.reproducibility import rng_state

# Files opened for reading while a list is set here (the audit hook cannot be removed, so it stays
# installed for the session and records nothing otherwise).
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def _save_run(run_dir: Path, steps: int, *, keep_last: int = 0, first: int = 1) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with CheckpointManager(run_dir, keep_last=keep_last, keep_best=0, monitor_metric="val/loss", monitor_mode="min",
                           async_save=False) as manager:  # fmt: skip
        for step in range(first, steps + 1):
            model(torch.randn(3, 4)).square().mean().backward()
            optimizer.step()
            state = {"run_name": run_dir.name, "run_id": 1, "step": step, "epoch": 1, "metrics_history": [],
                     "saved_at": time.time()}  # fmt: skip
            manager.save(step, model=model, optimizer=optimizer, training_state={"rng": rng_state()},
                         trainer_state=state, manifest_fields={"metrics": {"val/loss": 1.0 / step}})  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "ws" / "checkpoints" / "run"
    _save_run(run, 6)
    return run


def _order(entries: list) -> list[tuple[str, float]]:
    return [(e.name, e.saved_at) for e in entries]


def test_each_save_leaves_an_index_that_ranks_exactly_as_reading_every_manifest(run_dir: Path) -> None:
    index = json.loads((run_dir / INDEX_FILE).read_text())
    assert sorted(index["entries"]) == [step_dir_name(s) for s in range(1, 7)]
    full, _ = ranked_checkpoints(run_dir)
    fast, _ = ranked_checkpoints(run_dir, use_index=True)
    assert _order(fast) == _order(full)
    assert [e.metric("val/loss") for e in fast] == [e.metric("val/loss") for e in full]
    assert all(e.manifest is None for e in fast)  # every one came from the index


def test_recovery_reads_the_manifest_of_the_newest_checkpoint_only(run_dir: Path) -> None:
    global _opened
    _opened = []
    try:
        results = recover(run_dir.parent.parent, search_dirs=[])
    finally:
        opened, _opened = _opened, None
    assert Path(results["checkpoint_path"]).name == "step-000006"
    manifests = sorted(Path(p).parent.name for p in opened if Path(p).name == MANIFEST_NAME)
    assert manifests == ["step-000006"]


def test_an_index_entry_is_used_only_while_its_manifest_is_unchanged(run_dir: Path) -> None:
    index_path = run_dir / INDEX_FILE
    index = json.loads(index_path.read_text())
    # The index says step 2 is the newest: with its manifest unchanged, the index is believed...
    index["entries"]["step-000002"]["saved_at"] = time.time() + 1000
    index_path.write_text(json.dumps(index))
    fast, _ = ranked_checkpoints(run_dir, use_index=True)
    assert fast[0].name == "step-000002"
    # ... and once the manifest is rewritten (same bytes, a new ctime), its own saved_at is read again.
    manifest = run_dir / "step-000002" / MANIFEST_NAME
    time.sleep(0.01)
    manifest.write_bytes(manifest.read_bytes())
    fast, _ = ranked_checkpoints(run_dir, use_index=True)
    assert _order(fast) == _order(ranked_checkpoints(run_dir)[0])
    assert fast[0].name == "step-000006"


@pytest.mark.parametrize("damage", ["garbage", "empty", "other format", "missing"])
def test_a_damaged_or_missing_index_ranks_as_a_full_read(run_dir: Path, damage: str) -> None:
    index_path = run_dir / INDEX_FILE
    if damage == "missing":
        index_path.unlink()
    else:
        index_path.write_text({"garbage": "{not json", "empty": "", "other format": '{"format": 99}'}[damage])
    fast, _ = ranked_checkpoints(run_dir, use_index=True)
    assert _order(fast) == _order(ranked_checkpoints(run_dir)[0])
    assert recover(run_dir, search_dirs=[])["checkpoint_path"].endswith("step-000006")


def test_a_checkpoint_the_index_does_not_know_and_a_deleted_one_are_seen(run_dir: Path) -> None:
    stale = (run_dir / INDEX_FILE).read_bytes()
    _save_run(run_dir, 8, first=7)
    (run_dir / INDEX_FILE).write_bytes(stale)  # an index from before steps 7 and 8
    os.rename(run_dir / "step-000006", run_dir.parent / "moved-away")
    fast, _ = ranked_checkpoints(run_dir, use_index=True)
    assert _order(fast) == _order(ranked_checkpoints(run_dir)[0])
    assert [e.name for e in fast][:2] == ["step-000008", "step-000007"]
    assert "step-000006" not in [e.name for e in fast]


def test_the_checkpoint_recovery_takes_is_still_checked_when_the_index_vouches_for_it(run_dir: Path) -> None:
    (run_dir / "step-000006" / "model.safetensors").unlink()  # its manifest is unchanged: the index entry stands
    results = recover(run_dir, search_dirs=[])
    assert results["checkpoint_path"].endswith("step-000005")
    assert any(s["path"].endswith("step-000006") and "model.safetensors" in s["reason"] for s in results["skipped"])


def test_a_failure_to_write_the_index_never_fails_a_save(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / (INDEX_FILE + ".tmp")).mkdir()  # the index's temporary file cannot be written
    _save_run(run, 2)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000001", "step-000002"]
    assert not (run / INDEX_FILE).exists()
    assert recover(run, search_dirs=[])["checkpoint_path"].endswith("step-000002")


def test_retention_keeps_the_index_to_the_folders_that_remain(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_run(run, 5, keep_last=2)
    refresh_index(run)
    assert sorted(json.loads((run / INDEX_FILE).read_text())["entries"]) == ["step-000004", "step-000005"]
