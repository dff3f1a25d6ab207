"""Hostile and broken input: code-running pickles, newer formats, symlinks, odd names, odd sizes, garbage."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.training.engine.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    TRAINER_FILE,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_training_state,
)
from utils.training.engine.commit import (
    MANIFEST_NAME,
    CheckpointCorrupt,
    UnsupportedFormat,
    cheap_check,
    new_hasher,
    read_manifest,
    verify,
    write_manifest,
)
from utils.training.engine.metrics_log import METRICS_FILE, read_metrics_log
from utils.training.engine.recovery import recover
from utils.training.engine.runlock import RunLocked
from utils.training.engine.trainer import ResumeError, Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN = "r"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, TRAINER_FILE, MANIFEST_NAME)


def run_dir_of(workspace: Path) -> Path:
    return workspace / "checkpoints" / RUN


def reseal(folder: Path) -> None:
    """Rewrite the manifest so that it matches the files as they are now: what someone who
    hands over a hostile checkpoint would do, so that only the loader stands in the way."""
    old = read_manifest(folder)
    files = {}
    for name in old["files"]:
        raw = (folder / name).read_bytes()
        hasher = new_hasher()
        hasher.update(raw)
        files[name] = {"size_bytes": len(raw), "hash": hasher.hexdigest()}
    kept = {k: v for k, v in old.items() if k not in ("format_version", "hash_algorithm", "created_at", "files")}
    kept.pop("manifest_hash", None)
    (folder / MANIFEST_NAME).unlink()
    write_manifest(folder, files, **kept)
    verify(folder)


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_running_payloads(marker: Path) -> dict[str, bytes]:
    """A torch zip whose data.pkl calls os.system, and a bare protocol-0 pickle that does."""
    zipped = Path(str(marker) + ".zip")
    torch.save({"optimizer": RunsCode(marker)}, zipped)
    bare = pickle.dumps(RunsCode(marker), protocol=0)
    assert b"system" in zipped.read_bytes() and b"system" in bare
    return {"torch zip": zipped.read_bytes(), "bare pickle": bare}


# -- pickles that try to run code ---------------------------------------------------------
@pytest.mark.parametrize("form", ["torch zip", "bare pickle"])
def test_a_training_state_whose_pickle_runs_code_is_refused_and_never_executed(
    tmp_path: Path, workspace_copy: Path, trained_workspace: dict, form: str
) -> None:
    marker = tmp_path / "code-ran"
    payload = code_running_payloads(marker)[form]
    newest = run_dir_of(workspace_copy) / "step-000010"
    (newest / STATE_FILE).write_bytes(payload)
    reseal(newest)  # every hash matches: the loader alone must refuse it

    with pytest.raises(CheckpointCorrupt, match=f"refused to load {STATE_FILE}") as info:
        read_training_state(newest / STATE_FILE)
    assert "not executed" in str(info.value)
    with pytest.raises(CheckpointCorrupt):
        load_checkpoint(newest)
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    trainer = Trainer(config, progress=False)
    assert trainer.fit()["completed"]
    assert any(str(newest) in m and "refused to load" in m for m in trainer.messages), trainer.messages
    assert not marker.exists(), "the payload ran"

    (newest / STATE_FILE).write_bytes(payload)  # the resume replaced it: plant it again
    reseal(newest)
    named = subprocess.run(
        [sys.executable, "-m", "utils.training", "train", "--config", str(_config_file(config, tmp_path)),
         "--resume", str(newest)],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert named.returncode == 1
    (line,) = named.stderr.strip().splitlines()
    assert line.startswith("error: ") and STATE_FILE in line and "not executed" in line
    assert not marker.exists(), "the payload ran"


def _config_file(config, tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(config.to_json(), encoding="utf-8")
    return path


# -- newer formats ------------------------------------------------------------------------
@pytest.mark.parametrize("file", [MANIFEST_NAME, TRAINER_FILE])
def test_json_written_by_a_newer_format_version_is_refused_with_a_message(workspace_copy: Path, file: str) -> None:
    newest = run_dir_of(workspace_copy) / "step-000010"
    data = json.loads((newest / file).read_text())
    data["format_version"] += 5
    (newest / file).write_text(json.dumps(data))
    if file == TRAINER_FILE:
        reseal(newest)
    with pytest.raises(UnsupportedFormat, match="upgrade the package") as info:
        load_checkpoint(newest)
    assert f"format version {data['format_version']}" in info.value.reason
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"].endswith("step-000009")
    (skip,) = [s for s in results["skipped"] if s["path"] == str(newest)]
    assert "format version" in skip["reason"]


def test_a_resume_never_overwrites_a_checkpoint_of_a_newer_format(
    workspace_copy: Path, trained_workspace: dict
) -> None:
    newest = run_dir_of(workspace_copy) / "step-000010"
    data = json.loads((newest / TRAINER_FILE).read_text())
    data["format_version"] += 1
    (newest / TRAINER_FILE).write_text(json.dumps(data))
    reseal(newest)
    before = {name: (newest / name).read_bytes() for name in CHECKPOINT_FILES}
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    with pytest.raises(ResumeError, match="newer version"):  # refused, not fallen back from
        Trainer(config, progress=False).fit()
    assert {name: (newest / name).read_bytes() for name in CHECKPOINT_FILES} == before


# -- symlinks -----------------------------------------------------------------------------
def test_symlink_loops_and_symlinked_checkpoints_are_refused_never_followed(
    tmp_path: Path, workspace_copy: Path, trained_workspace: dict
) -> None:
    run_dir = run_dir_of(workspace_copy)
    (run_dir / "step-000099").symlink_to("step-000099")  # a loop named like a checkpoint
    (workspace_copy / "checkpoints" / "loop").symlink_to("loop")
    (run_dir / "step-000010" / "loop").symlink_to("loop")  # not in the manifest: ignored
    outside = tmp_path / "someone-elses-checkpoint"
    shutil.move(run_dir / "step-000010", outside)
    (run_dir / "step-000010").symlink_to(outside)  # complete and valid, but not ours to take
    loop_dir = tmp_path / "looping"
    loop_dir.symlink_to(loop_dir)

    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"].endswith("step-000009")
    reasons = {Path(s["path"]).name: s["reason"] for s in results["skipped"]}
    assert "symlink" in reasons["step-000099"] and "symlink" in reasons["step-000010"]
    with pytest.raises(CheckpointError):
        recover(loop_dir, search_dirs=[])

    verified = subprocess.run(
        [sys.executable, "-m", "utils.training", "verify", str(workspace_copy)],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verified.returncode == 1 and "symlink" in verified.stderr and "Traceback" not in verified.stderr

    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    trainer = Trainer(config, progress=False)
    assert trainer.fit()["completed"]  # resumed from step-000009, wrote a real step-000010
    assert not (run_dir / "step-000010").is_symlink()
    verify(outside)  # the symlink's target was never touched (nor its manifest deleted)
    verify(run_dir / "step-000010")

    (run_dir / ".lock").unlink(missing_ok=True)
    (run_dir / ".lock").symlink_to(".lock")
    with pytest.raises(RunLocked, match="lock file"):
        Trainer(config, progress=False).fit()


# -- odd names and sizes ------------------------------------------------------------------
def test_non_utf8_names_in_the_workspace_are_handled(workspace_copy: Path) -> None:
    odd = os.fsdecode(b"\xff\xfe-\x80")
    checkpoints = workspace_copy / "checkpoints"
    shutil.copytree(run_dir_of(workspace_copy), checkpoints / odd)  # a run with a non-UTF-8 name
    (run_dir_of(workspace_copy) / odd).write_bytes(b"x")
    (run_dir_of(workspace_copy) / "step-000010" / odd).write_bytes(b"not in the manifest")
    os.utime(checkpoints / odd / "step-000010", (2e9, 2e9))  # the newest run
    results = recover(workspace_copy, search_dirs=[])
    assert results["run_dir"] == str(checkpoints / odd)
    json.dumps(results)  # serialisable as it is
    verify(run_dir_of(workspace_copy) / "step-000010")
    for command in (["recover", "--checkpoint-dir", str(workspace_copy)], ["verify", str(workspace_copy)]):
        done = subprocess.run(
            [sys.executable, "-m", "utils.training", *command], cwd=REPO_ROOT, env=ENV, capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert b"\xff\xfe-\x80" in done.stdout  # the name is shown as it is on disk


@pytest.mark.parametrize("file", CHECKPOINT_FILES)
def test_zero_byte_files_are_not_checkpoints(workspace_copy: Path, file: str) -> None:
    newest = run_dir_of(workspace_copy) / "step-000010"
    (newest / file).write_bytes(b"")
    with pytest.raises(CheckpointCorrupt):
        cheap_check(newest)
    assert recover(workspace_copy, search_dirs=[])["checkpoint_path"].endswith("step-000009")
    if file != MANIFEST_NAME:  # sealed as zero bytes: every hash matches, the readers refuse it
        reseal(newest)
        with pytest.raises(CheckpointCorrupt):
            load_checkpoint(newest)


def test_zero_byte_run_files_do_not_break_recovery_or_resume(workspace_copy: Path, trained_workspace: dict) -> None:
    run_dir = run_dir_of(workspace_copy)
    for name in ("run.json", METRICS_FILE, ".lock"):
        (run_dir / name).write_bytes(b"")
    results = recover(workspace_copy, search_dirs=[])
    assert [r["epoch"] for r in results["metrics_history"]] == [1, 2]  # from the checkpoint itself
    shutil.rmtree(run_dir / "step-000010")  # so that the resume has a step to train
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    assert Trainer(config, progress=False).fit()["completed"]
    assert [json.loads(line)["epoch"] for line in (run_dir / METRICS_FILE).read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("file", [MANIFEST_NAME, TRAINER_FILE, MODEL_FILE, METRICS_FILE, "run.json"])
def test_huge_sparse_files_are_refused_without_being_read(workspace_copy: Path, file: str) -> None:
    run_dir = run_dir_of(workspace_copy)
    path = run_dir / file if file in (METRICS_FILE, "run.json") else run_dir / "step-000010" / file
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(3 * 1024**3)  # 3 GiB of holes: reading it whole would take the memory
    results = recover(workspace_copy, search_dirs=[])
    if file in (METRICS_FILE, "run.json"):
        assert results["checkpoint_path"].endswith("step-000010")
        if file == METRICS_FILE:
            with pytest.raises(CheckpointCorrupt, match="larger than"):
                read_metrics_log(path)
    else:
        assert results["checkpoint_path"].endswith("step-000009")
        (skip,) = [s for s in results["skipped"] if s["path"].startswith(str(run_dir / "step-000010"))]
        assert "bytes" in skip["reason"]
        with pytest.raises(CheckpointCorrupt):
            verify(run_dir / "step-000010")


# -- garbage ------------------------------------------------------------------------------
def test_garbage_bytes_in_every_file_of_a_checkpoint(workspace_copy: Path, trained_workspace: dict) -> None:
    run_dir = run_dir_of(workspace_copy)
    newest = run_dir / "step-000010"
    rng = random.Random(7)
    for name in CHECKPOINT_FILES:
        path = newest / name
        path.write_bytes(rng.randbytes(path.stat().st_size))
    with pytest.raises(CheckpointCorrupt):
        verify(newest)
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"].endswith("step-000009")
    assert any(s["path"].startswith(str(newest)) for s in results["skipped"])
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    trainer = Trainer(config, progress=False)
    assert trainer.fit()["completed"]
    assert any(m.startswith(f"skipping checkpoint {newest}") for m in trainer.messages)


@pytest.mark.parametrize("file", [MODEL_FILE, STATE_FILE, TRAINER_FILE])
def test_sealed_garbage_is_refused_by_the_reader_of_each_file(workspace_copy: Path, file: str) -> None:
    newest = run_dir_of(workspace_copy) / "step-000010"
    path = newest / file
    path.write_bytes(random.Random(file).randbytes(path.stat().st_size))
    reseal(newest)  # hashes match the garbage: the parsers must refuse it
    with pytest.raises(CheckpointCorrupt) as info:
        load_checkpoint(newest)
    assert info.value.path == str(path)
    results = recover(workspace_copy, search_dirs=[])  # metadata only: it reads the trainer state
    assert results["checkpoint_path"].endswith("step-000009" if file == TRAINER_FILE else "step-000010")


def test_garbage_in_the_run_files_does_not_break_recovery(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    rng = random.Random(3)
    for name in ("run.json", METRICS_FILE, ".lock"):
        (run_dir / name).write_bytes(rng.randbytes(4096))
    (run_dir / "step-000010" / TRAINER_FILE).parent.joinpath("extra").write_bytes(rng.randbytes(100))
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"].endswith("step-000010")
    assert [r["epoch"] for r in results["metrics_history"]] == [1, 2]
    assert read_metrics_log(run_dir / METRICS_FILE) == []
    for _, path in list_checkpoints(run_dir):
        verify(path)
