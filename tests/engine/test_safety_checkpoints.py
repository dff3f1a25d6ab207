"""Issue 10, checkpoint side: commit never trashes a good folder, fsync errors surface, verify names
what is missing or unlisted, name/manifest step disagreement, retention/newest/best among
checkpoints that verify, a listing error is not "no checkpoints", planted DCP pickles never run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.training.engine import commit
from utils.training.engine.checkpoint import (
    MODEL_FILE,
    TRAINER_FILE,
    CheckpointManager,
    apply_retention,
    best_verified_checkpoint,
    latest_verified_checkpoint,
    list_checkpoints,
)
from utils.training.engine.checkpoint_index import CheckpointListingError, prune_checkpoints
from utils.training.engine.commit import (
    ABANDONED_DIR,
    MANIFEST_NAME,
    CheckpointCorrupt,
    CheckpointExists,
    CheckpointWriteError,
    cheap_check,
    commit_dir,
    fsync_dir,
    hash_file,
    new_temp_dir,
    remove_tree,
    verify,
    write_manifest,
)
from utils.training.engine.dist_checkpoint import (
    DCP_DIR,
    UnsafeCheckpoint,
    load_distributed,
    read_dcp_metadata,
)
from utils.training.engine.recovery import recover

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
RUN = "r"


def cli(*args: str, cwd: Path = REPO_ROOT, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "utils.training", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def run_dir_of(workspace: Path) -> Path:
    return workspace / "checkpoints" / RUN


def zero_fill(path: Path) -> None:
    """Same size, every byte zero: what a mount that has not written back yet shows."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())


def flip_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def tiny_checkpoint(parent: Path, step: int, *, payload: bytes = b"x") -> Path:
    tmp = new_temp_dir(parent, f"step-{step:06d}")
    (tmp / "data.bin").write_bytes(payload)
    write_manifest(tmp, {"data.bin": hash_file(tmp / "data.bin")}, step=step)
    final = parent / f"step-{step:06d}"
    commit_dir(tmp, final)
    return final


# -- item 5: commit_dir --------------------------------------------------------------------
def test_commit_never_replaces_a_verified_folder_of_the_same_name(tmp_path: Path) -> None:
    good = tiny_checkpoint(tmp_path, 7, payload=b"good")
    tmp = new_temp_dir(tmp_path, "step-000007")
    (tmp / "data.bin").write_bytes(b"other")
    write_manifest(tmp, {"data.bin": hash_file(tmp / "data.bin")}, step=7)
    with pytest.raises(CheckpointExists, match="verifies already"):
        commit_dir(tmp, good)
    assert (good / "data.bin").read_bytes() == b"good"
    verify(good)


def test_commit_sets_an_unverified_leftover_aside_instead_of_deleting_it(tmp_path: Path) -> None:
    old = tiny_checkpoint(tmp_path, 7, payload=b"damaged later")
    zero_fill(old / "data.bin")
    new = tiny_checkpoint(tmp_path, 7, payload=b"fresh bytes!!")
    assert (new / "data.bin").read_bytes() == b"fresh bytes!!"
    verify(new)
    (aside,) = list((tmp_path / ABANDONED_DIR).glob("*/step-000007"))
    assert (aside / "data.bin").read_bytes() == b"\0" * len(b"damaged later")  # kept, not deleted


# -- item 7: fsync_dir, remove_tree -----------------------------------------------------------
def test_fsync_dir_surfaces_eio_and_ignores_only_not_supported(tmp_path: Path, monkeypatch) -> None:
    def failing(code: int):
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))

        return fsync

    monkeypatch.setattr(commit.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError) as info:
        fsync_dir(tmp_path)
    assert info.value.errno == errno.EIO
    for code in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
        monkeypatch.setattr(commit.os, "fsync", failing(code))
        fsync_dir(tmp_path)  # a filesystem that cannot fsync a folder: ignored


def test_remove_tree_reports_what_it_could_not_delete(tmp_path: Path) -> None:
    folder = tiny_checkpoint(tmp_path, 3)
    stuck = folder / "stuck.bin"
    stuck.write_bytes(b"x")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        failures = remove_tree(folder)
        assert failures and "stuck.bin" in failures[0]
        with pytest.raises(commit.RemoveFailed):
            remove_tree(next(tmp_path.glob(".trash-*")), strict=True)
    finally:
        for path in tmp_path.rglob("stuck.bin"):
            subprocess.run(["chattr", "-i", str(path)], check=False)


# -- item 18 and item 1: verify --------------------------------------------------------------
def test_verify_of_a_step_folder_without_manifest_names_the_missing_manifest(workspace_copy: Path) -> None:
    folder = run_dir_of(workspace_copy) / "step-000010"
    (folder / MANIFEST_NAME).unlink()
    done = cli("verify", str(folder))
    assert done.returncode == 1
    assert "MANIFEST.json is missing" in done.stdout + done.stderr
    assert "no checkpoint (step-NNNNNN folder)" not in done.stderr


def test_verify_warns_about_unlisted_files_and_fails_on_an_unlisted_dcp(workspace_copy: Path) -> None:
    folder = run_dir_of(workspace_copy) / "step-000010"
    (folder / "notes.txt").write_text("mine")
    done = cli("verify", str(folder))
    assert done.returncode == 0, done.stderr
    assert "warn" in done.stdout and "notes.txt is not listed in the manifest" in done.stdout
    (folder / DCP_DIR).mkdir()
    (folder / DCP_DIR / ".metadata").write_bytes(b"anything")
    done = cli("verify", str(folder))
    assert done.returncode == 1
    assert "dcp/ is not listed in the manifest" in done.stdout + done.stderr


# -- item 1: a planted DCP pickle never runs ---------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_restricted_unpickler_refuses_a_payload_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"posix\.system|os\.system"):
        read_dcp_metadata(path)
    assert not marker.exists()


def config_file_for(trained_workspace: dict, workspace: Path) -> Path:
    """The shared run's own config, pointed at a copy: a resume with exactly its settings."""
    path = workspace.parent / "config.json"
    path.write_text(trained_workspace["config"].replace(workspace_root=str(workspace)).to_json())
    return path


def test_train_resume_auto_never_runs_a_pickle_planted_in_dcp(workspace_copy: Path, trained_workspace) -> None:
    run_dir = run_dir_of(workspace_copy)
    marker = workspace_copy / "pwned"
    newest = run_dir / "step-000010"
    (newest / DCP_DIR).mkdir()
    (newest / DCP_DIR / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    done = cli("verify", str(newest))
    assert done.returncode == 1 and not marker.exists()
    done = cli("train", "--config", str(config_file_for(trained_workspace, workspace_copy)), "--resume", "auto")
    assert not marker.exists(), "the planted payload ran"
    assert done.returncode == 0, done.stderr
    assert "dcp/ is not listed" in done.stderr  # the fallback past it is said, and it is set aside
    assert not (run_dir / "step-000010" / DCP_DIR).exists()
    assert list((run_dir / ABANDONED_DIR).glob("*/step-000010/dcp/.metadata"))


def test_a_real_dcp_checkpoint_still_loads_through_the_restricted_reader(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    tmp = new_temp_dir(tmp_path, "step-000001")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / DCP_DIR)
    files = {p.relative_to(tmp).as_posix(): hash_file(p) for p in tmp.rglob("*") if p.is_file()}
    write_manifest(tmp, files, step=1)
    commit_dir(tmp, tmp_path / "step-000001")

    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    load_distributed(tmp_path / "step-000001", fresh, fresh_optimizer)
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(
        fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    # A file added under dcp/ after the seal is refused, not read.
    (tmp_path / "step-000001" / DCP_DIR / "extra.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointCorrupt, match="not listed in the manifest"):
        load_distributed(tmp_path / "step-000001", fresh, fresh_optimizer)


# -- item 12: folder name vs manifest step ------------------------------------------------------
def test_a_copied_step_folder_is_skipped_with_its_reason(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    shutil.copytree(run_dir / "step-000003", run_dir / "step-000999")
    with pytest.raises(CheckpointCorrupt, match="folder name says step 999 but its manifest says step 3"):
        cheap_check(run_dir / "step-000999")
    results = recover(workspace_copy, search_dirs=[])
    assert results["checkpoint_path"] == str(run_dir / "step-000010") and results["step"] == 10
    assert any(s["path"].endswith("step-000999") and "manifest says step 3" in s["reason"] for s in results["skipped"])


# -- item 2 (listing): an unlistable run folder is not "no checkpoints" -------------------------
def test_a_listing_error_is_an_error_not_an_empty_run(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # ELOOP on every listing: a real OSError that is not "missing"
    with pytest.raises(CheckpointListingError, match="cannot list the run folder"):
        list_checkpoints(loop)
    assert list_checkpoints(tmp_path / "absent") == []


# -- items 11 and 3: retention keeps only checkpoints that verify ----------------------------
def test_retention_never_deletes_new_checkpoints_to_keep_full_size_corrupt_ones(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    for step in (9, 10):  # the two newest and the best: zero-filled at full size
        zero_fill(run_dir / f"step-{step:06d}" / MODEL_FILE)
    result = prune_checkpoints(run_dir, keep_last=2, keep_best=1, monitor_metric="val/loss", monitor_mode="min")
    assert {p.name for p in result.kept} >= {"step-000006", "step-000005"}
    assert {p.name for p in result.deleted} <= {"step-000003"}
    assert {Path(d["path"]).name for d in result.damaged} == {"step-000009", "step-000010"}
    remaining = {p.name for _, p in list_checkpoints(run_dir)}
    assert {"step-000005", "step-000006", "step-000009", "step-000010"} <= remaining  # damaged left for a person


def test_retention_ranks_by_saved_at_not_by_step_number(workspace_copy: Path) -> None:
    """A newer branch's checkpoint with a lower step than older ones is the newest."""
    run_dir = run_dir_of(workspace_copy)
    # Make step-000005 the most recently saved (as a rollback branch's save would be).
    state_path = run_dir / "step-000005" / TRAINER_FILE
    state = json.loads(state_path.read_text())
    state["saved_at"] = 4e9
    raw = json.dumps(state).encode()
    state_path.write_bytes(raw)
    manifest = commit.read_manifest(run_dir / "step-000005")
    manifest["files"][TRAINER_FILE] = hash_file(state_path)
    fields = {k: v for k, v in manifest.items() if k not in ("files", commit.MANIFEST_HASH_KEY, "format_version",
                                                              "hash_algorithm", "created_at")}  # fmt: skip
    fields["saved_at"] = 4e9  # a save records it in both files
    (run_dir / "step-000005" / MANIFEST_NAME).unlink()
    write_manifest(run_dir / "step-000005", manifest["files"], **fields)
    deleted = apply_retention(run_dir, keep_last=1, keep_best=0, monitor_metric="val/loss", monitor_mode="max")
    assert run_dir / "step-000005" not in deleted and (run_dir / "step-000005").is_dir()
    assert latest_verified_checkpoint(run_dir)[0] == run_dir / "step-000005"


# -- item 7 and 15: best checkpoint missing / damaged -----------------------------------------
def test_a_missing_best_checkpoint_is_reported_in_skipped(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    best = run_dir / "step-000005"  # at step 9 the best so far is the end of epoch 1
    assert recover(run_dir / "step-000009", search_dirs=[])["best_checkpoint_path"] == str(best)
    shutil.rmtree(best)
    results = recover(run_dir / "step-000009", search_dirs=[])
    assert any(s["path"] == str(best) and "recorded best checkpoint" in s["reason"] for s in results["skipped"])
    assert Path(results["best_checkpoint_path"]).is_dir() and Path(results["best_checkpoint_path"]).parent == run_dir


def test_best_and_newest_that_verify_pass_over_zero_filled_ones(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    zero_fill(run_dir / "step-000010" / MODEL_FILE)
    newest, skipped = latest_verified_checkpoint(run_dir)
    assert newest == run_dir / "step-000009"
    assert skipped[0]["path"] == str(run_dir / "step-000010") and "hash" in skipped[0]["reason"]
    best, skipped = best_verified_checkpoint(run_dir, recorded=run_dir / "step-000010")
    assert best is not None and best != run_dir / "step-000010"
    verify(best)
    assert any(s["path"] == str(run_dir / "step-000010") for s in skipped)


# -- item 4: a failed background save never swallows the next -----------------------------------
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_save_does_not_drop_the_next_one(tmp_path: Path, async_save: bool) -> None:
    model = torch.nn.Linear(3, 2)
    kwargs = dict(keep_last=0, keep_best=1, monitor_metric="val/loss", monitor_mode="min", async_save=async_save)
    state = dict(training_state={"x": torch.zeros(2)}, trainer_state={"step": 1, "saved_at": 1.0})
    with CheckpointManager(tmp_path, **kwargs) as manager:
        manager.save(1, model_state=model.state_dict(), **state)
        manager.wait_until_finished()
    manager = CheckpointManager(tmp_path, **kwargs)
    try:
        manager.save(1, model_state=model.state_dict(), **state)  # step-000001 verifies: this one fails
    except CheckpointWriteError:
        pass  # the sync path raises at once; the async one at the next check
    try:
        manager.save(2, model_state=model.state_dict(), training_state=state["training_state"],
                     trainer_state={"step": 2, "saved_at": 2.0})  # fmt: skip
    except CheckpointWriteError as exc:
        assert "step-000001" in str(exc)  # the earlier failure surfaces; this state was handed over
    # close() raises the failure still pending (async); the caller's on_save_error decides.
    with pytest.raises(CheckpointWriteError) if async_save else contextlib.nullcontext():
        manager.close()
    verify(tmp_path / "step-000002")
