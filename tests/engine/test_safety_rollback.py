"""Issue 10, rollback side: an explicit older checkpoint starts a branch (newer checkpoints and log
lines move to abandoned/, crash-safe through a journal); auto continues the branch; damage
refuses instead of starting over; resume=never sets a wholly damaged run aside."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.training.engine.checkpoint import MODEL_FILE, STATE_FILE, list_checkpoints, read_model_file
from utils.training.engine.checkpoint_index import CheckpointListingError
from utils.training.engine.commit import ABANDONED_DIR, commit_dir, hash_file, new_temp_dir, verify, write_manifest
from utils.training.engine.experiment_db import ExperimentDB
from utils.training.engine.recovery import recover
from utils.training.engine.rollback import (
    JOURNAL_FILE,
    ForeignCheckpoint,
    ResumeRefused,
    prepare_resume,
)
from utils.training.engine.serialization import read_training_state
from utils.training.engine.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
RUN = "r"


def run_dir_of(workspace: Path) -> Path:
    return workspace / "checkpoints" / RUN


def flip_byte(path: Path, offset: int = 200) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def tree_state(run_dir: Path) -> dict[str, bytes]:
    """Every file under the run folder with its bytes: "nothing on disk changed" compares these."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def config_file(trained_workspace: dict, workspace: Path, **changes) -> Path:
    path = workspace.parent / f"config-{len(list(workspace.parent.glob('config-*')))}.json"
    path.write_text(trained_workspace["config"].replace(workspace_root=str(workspace), **changes).to_json())
    return path


def train_cli(config: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "utils.training", "train", "--config", str(config), *extra],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# -- item 2: every checkpoint damaged -> refuse, nothing touched ---------------------------
def test_every_checkpoint_damaged_refuses_to_start_and_touches_nothing(workspace_copy: Path, trained_workspace) -> None:
    run_dir = run_dir_of(workspace_copy)
    for _, path in list_checkpoints(run_dir):
        flip_byte(path / MODEL_FILE)  # same size: only the hash tells
    before = tree_state(run_dir)
    done = train_cli(config_file(trained_workspace, workspace_copy, epochs=3))
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), done.stderr
    line = errors[0]
    assert "none verifies" in line and "step-000010" in line and "step-000003" in line
    assert "--run-name" in line and "verify" in line and "--resume never" in line
    after = tree_state(run_dir)
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before), "a refusal changed the disk"


def test_an_unlistable_run_folder_refuses_to_start(tmp_path: Path, make_config) -> None:
    config = make_config(tmp_path / "ws")
    config.checkpoint_dir.mkdir(parents=True)
    os.symlink(config.run_dir, config.run_dir)  # ELOOP whenever the run folder is listed
    with pytest.raises(CheckpointListingError, match="cannot list the run folder"):
        prepare_resume(config.run_dir, "auto")
    with pytest.raises(OSError):  # the trainer never gets as far as "no checkpoints: start over"
        Trainer(config, progress=False).fit()
    assert os.path.islink(config.run_dir) and sorted(os.listdir(config.checkpoint_dir)) == [RUN]


# -- resume=never -----------------------------------------------------------------------
def test_resume_never_refuses_while_a_checkpoint_verifies(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    before = tree_state(run_dir)
    with pytest.raises(ResumeRefused, match="verifies and resume=never"):
        prepare_resume(run_dir, "never")
    assert tree_state(run_dir) == before


def test_resume_never_sets_a_wholly_damaged_run_aside_and_starts_a_new_db_run(
    workspace_copy: Path, trained_workspace
) -> None:
    run_dir = run_dir_of(workspace_copy)
    names = sorted(p.name for _, p in list_checkpoints(run_dir))
    for _, path in list_checkpoints(run_dir):
        flip_byte(path / MODEL_FILE)
    old_metrics = (run_dir / "metrics.jsonl").read_bytes()
    old_run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    done = train_cli(config_file(trained_workspace, workspace_copy), "--resume", "never")
    assert done.returncode == 0, done.stderr
    (batch,) = (run_dir / ABANDONED_DIR).iterdir()
    assert sorted(p.name for p in batch.glob("step-*")) == names  # all of them, nothing deleted
    assert (batch / "metrics.jsonl").read_bytes() == old_metrics and (batch / "run.json").is_file()
    new_run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert new_run_id != old_run_id
    with ExperimentDB(workspace_copy / "experiments.db") as db:
        assert db.get_run(new_run_id)["status"] == "completed"
    results = recover(workspace_copy, search_dirs=[])
    assert results["run_id"] == new_run_id and results["step"] == 10
    assert any(s["path"] == str(batch) for s in results["skipped"])


# -- rollback ---------------------------------------------------------------------------
def test_an_explicit_older_checkpoint_moves_newer_ones_and_their_log_lines_aside(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = prepare_resume(run_dir, str(run_dir / "step-000005"))
    assert plan.checkpoint == run_dir / "step-000005" and plan.batch is not None
    assert plan.batch.parent == run_dir / ABANDONED_DIR
    assert len(plan.batch.name) == len("20261201T020233Z") and plan.batch.name.endswith("Z")
    assert sorted(p.name for _, p in list_checkpoints(run_dir)) == ["step-000003", "step-000005"]
    assert sorted(p.name for p in plan.batch.glob("step-*")) == ["step-000006", "step-000009", "step-000010"]
    kept = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (plan.batch / "metrics.jsonl").read_text().splitlines()]
    assert kept + cut == rows and all(r["step"] <= 5 for r in kept) and all(r["step"] > 5 for r in cut)
    assert not (run_dir / JOURNAL_FILE).exists()
    for item in plan.set_aside:
        verify(Path(item["path"]))  # moved intact


def test_a_checkpoint_of_another_run_is_refused(workspace_copy: Path) -> None:
    other = workspace_copy / "checkpoints" / "other"
    shutil.copytree(run_dir_of(workspace_copy), other)
    with pytest.raises(ForeignCheckpoint, match="not a checkpoint of this run"):
        prepare_resume(run_dir_of(workspace_copy), str(other / "step-000005"))


def test_auto_falls_back_past_a_damaged_newest_and_sets_it_aside(workspace_copy: Path) -> None:
    run_dir = run_dir_of(workspace_copy)
    flip_byte(run_dir / "step-000010" / MODEL_FILE)
    plan = prepare_resume(run_dir, "auto")
    assert plan.checkpoint == run_dir / "step-000009"
    (item,) = plan.set_aside
    assert item["path"].endswith("step-000010") and "hash" in item["reason"]
    assert not (run_dir / "step-000010").exists()
    # What was set aside is not part of the run: verify of the workspace passes.
    done = subprocess.run([sys.executable, "-m", "utils.training", "verify", str(workspace_copy)], cwd=REPO_ROOT,
                          env=ENV, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_rollback_with_retention_keeps_the_new_branch(workspace_copy: Path, trained_workspace) -> None:
    """Item 3: train to 10 with every checkpoint kept, roll back to 5 with keep-last 2: the new
    branch's checkpoints survive retention and recovery returns the new branch's newest."""
    run_dir = run_dir_of(workspace_copy)
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy), keep_last=2)
    results = Trainer(config, resume=str(run_dir / "step-000005"), progress=False).fit()
    assert results["status"] == "completed"
    on_branch = {p.name for _, p in list_checkpoints(run_dir)}
    assert "step-000010" in on_branch and "step-000009" in on_branch
    new_10 = run_dir / "step-000010"
    old_10 = next((run_dir / ABANDONED_DIR).glob("*/step-000010"))
    recovered = recover(workspace_copy, search_dirs=[])
    assert recovered["checkpoint_path"] == str(new_10)
    new_state = json.loads((new_10 / "trainer_state.json").read_text())
    old_state = json.loads((old_10 / "trainer_state.json").read_text())
    assert new_state["saved_at"] > old_state["saved_at"]
    # The database rows past the branch point are kept as abandoned, not deleted.
    with sqlite3.connect(workspace_copy / "experiments.db") as conn:
        abandoned = conn.execute("SELECT DISTINCT step, branch FROM abandoned_metrics").fetchall()
    assert abandoned == [(10, old_10.parent.name)]
    # Rolled back to 5 and replayed to 10 with the same data: the same weights, bit for bit.
    a, b = read_model_file(new_10 / MODEL_FILE), read_model_file(old_10 / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in b)


# -- a journal finished by the next start ------------------------------------------------
ROLLBACK_SCRIPT = """
import sys
from utils.training.engine.rollback import prepare_resume
prepare_resume(sys.argv[1], sys.argv[2])
"""


def fake_run(run_dir: Path, steps: int) -> None:
    """A run folder of small sealed checkpoints and a metrics line per checkpoint."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        tmp = new_temp_dir(run_dir, f"step-{step:06d}")
        (tmp / "data.bin").write_bytes(os.urandom(64))
        write_manifest(tmp, {"data.bin": hash_file(tmp / "data.bin")}, step=step)
        commit_dir(tmp, run_dir / f"step-{step:06d}")
        lines.append(json.dumps({"epoch": step, "step": step}) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    (run_dir / "steps.jsonl").write_text("".join(lines))


def final_layout(run_dir: Path) -> tuple[list[str], list[str], str, str, list[str]]:
    moved = sorted(p.name for p in (run_dir / ABANDONED_DIR).glob("*/step-*"))
    cut = sorted(line for p in (run_dir / ABANDONED_DIR).glob("*/metrics.jsonl") for line in p.read_text().splitlines())
    return (sorted(p.name for _, p in list_checkpoints(run_dir)), moved,
            (run_dir / "metrics.jsonl").read_text(), (run_dir / "steps.jsonl").read_text(), cut)  # fmt: skip


@pytest.mark.slow
def test_sigkill_at_random_moments_inside_the_set_aside_is_finished_by_the_next_start(tmp_path: Path) -> None:
    reference = tmp_path / "reference" / RUN
    fake_run(reference, 60)
    prepare_resume(reference, str(reference / "step-000010"))
    expected = final_layout(reference)
    rng = random.Random(10)
    inside = 0
    for attempt in range(8):
        run_dir = tmp_path / f"killed-{attempt}" / RUN
        fake_run(run_dir, 60)
        proc = subprocess.Popen([sys.executable, "-c", ROLLBACK_SCRIPT, str(run_dir), str(run_dir / "step-000010")],
                                cwd=REPO_ROOT, env=ENV)  # fmt: skip
        deadline = time.monotonic() + 60
        while not (run_dir / JOURNAL_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        inside += (run_dir / JOURNAL_FILE).exists()
        prepare_resume(run_dir, str(run_dir / "step-000010"))  # the same command again
        assert not (run_dir / JOURNAL_FILE).exists()
        assert final_layout(run_dir) == expected, f"attempt {attempt} differs from an uninterrupted rollback"
    assert inside >= 1, "no kill landed inside the set-aside; the test proves nothing"


# -- a real training run killed during a rollback, resumed with the same command ------------
@pytest.mark.slow
def test_a_rollback_sigkilled_at_random_moments_ends_bit_identical(tmp_path: Path, trained_workspace) -> None:
    shared = trained_workspace["workspace"]
    reference_ws, killed_ws = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(shared, reference_ws, symlinks=True)
    shutil.copytree(shared, killed_ws, symlinks=True)
    ref_cfg = config_file(trained_workspace, reference_ws, save_every_steps=1)
    kill_cfg = config_file(trained_workspace, killed_ws, save_every_steps=1)
    branch = "step-000005"
    done = train_cli(ref_cfg, "--resume", str(run_dir_of(reference_ws) / branch))
    assert done.returncode == 0, done.stderr
    rng = random.Random(1005)
    kills, attempts, latest = 0, 0, 4.0
    # Six kills at random moments; a run that finishes first (a quiet machine starts and trains in about
    # a second) is a complete branch, which the same command rolls back again, so it only narrows the window.
    while kills < 6 and attempts < 24:
        attempts += 1
        cmd = [sys.executable, "-m", "utils.training", "train", "--config", str(kill_cfg),
               "--resume", str(run_dir_of(killed_ws) / branch)]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.2, latest)
        time.sleep(delay)
        if proc.poll() is not None:
            latest = max(0.4, delay * 0.8)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3
    done = train_cli(kill_cfg, "--resume", str(run_dir_of(killed_ws) / branch))
    assert done.returncode == 0, done.stderr
    final, expected = run_dir_of(killed_ws) / "step-000010", run_dir_of(reference_ws) / "step-000010"
    a, b = read_model_file(final / MODEL_FILE), read_model_file(expected / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    sa, sb = read_training_state(final / STATE_FILE), read_training_state(expected / STATE_FILE)
    assert sa["data"] == sb["data"]
    for key, moments in sb["optimizer"]["state"].items():
        for which, tensor in moments.items():
            assert torch.equal(sa["optimizer"]["state"][key][which], tensor)
    timing = {"epoch_seconds", "tokens_per_second", "time"}
    rows = [json.loads(x) for x in (run_dir_of(killed_ws) / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (run_dir_of(reference_ws) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row, ref in zip(rows, ref_rows, strict=True):
        assert {k: v for k, v in row.items() if k not in timing} == {k: v for k, v in ref.items() if k not in timing}
    assert not (run_dir_of(killed_ws) / JOURNAL_FILE).exists()
    # Nothing deleted: every checkpoint of the original branch is in abandoned/.
    originals = {p.name for p in (run_dir_of(killed_ws) / ABANDONED_DIR).glob("*/step-*")}
    assert {"step-000006", "step-000009", "step-000010"} <= originals
