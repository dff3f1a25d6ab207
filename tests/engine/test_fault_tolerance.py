"""Fault tolerance: signals, time-based saves, corrupted checkpoints, crash cycles, the run lock, write failures."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from utils.training.__main__ import build_config, make_parser
from utils.training.config import TrainingConfig
from utils.training.engine.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    TRAINER_FILE,
    list_checkpoints,
    load_checkpoint,
    read_model_file,
)
from utils.training.engine.commit import (
    MANIFEST_NAME,
    TEMP_PREFIX,
    CheckpointCorrupt,
    CheckpointWriteError,
    cheap_check,
    read_json,
    verify,
)
from utils.training.engine.experiment_db import ExperimentDB
from utils.training.engine.metrics_log import METRICS_FILE
from utils.training.engine.recovery import recover
from utils.training.engine.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUN = "r"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, TRAINER_FILE, MANIFEST_NAME)


# -- helpers ------------------------------------------------------------------------------
def cli_config(workspace: Path, **overrides: Any) -> Path:
    """A small run as a config file, so the command line runs exactly the config the test built."""
    settings: dict[str, Any] = dict(
        workspace_root=str(workspace), run_name=RUN, epochs=2, steps_per_epoch=6, eval_batches=2, batch_size=4,
        corpus_max_bytes=400_000, save_every_seconds=0, keep_last=0, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    path = workspace.parent / f"{workspace.name}-config.json"
    workspace.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TrainingConfig.from_preset("tiny", **settings).to_json(), encoding="utf-8")
    return path


def train_cmd(config_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "utils.training", "train", "--config", str(config_file), "--json", *extra]


def popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def wait_for(condition, proc: subprocess.Popen | None = None, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended first (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def committed(run_dir: Path, step: int) -> bool:
    return (run_dir / f"step-{step:06d}" / MANIFEST_NAME).exists()


def lock_pid(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / ".lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def temp_folders(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = read_model_file(a / MODEL_FILE), read_model_file(b / MODEL_FILE)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), f"{name} differs between {a} and {b}"


def assert_same_metrics(rows: list[dict], reference: list[dict]) -> None:
    timing = {"epoch_seconds", "tokens_per_second", "samples_per_second", "time"}
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        assert {k: v for k, v in row.items() if k not in timing} == {k: v for k, v in ref.items() if k not in timing}


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()]


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def manifest_value_offset(path: Path, key: str) -> int:
    """Offset of the last digit of a number in the manifest: a flip there keeps valid JSON."""
    raw = path.read_bytes()
    start = raw.index(f'"{key}": '.encode()) + len(key) + 4
    end = start
    while raw[end : end + 1].isdigit() or raw[end : end + 1] == b".":
        end += 1
    return end - 1


# -- signals ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted command-line run the interrupted ones must match bit for bit."""
    workspace = tmp_path_factory.mktemp("reference") / "ws"
    done = run(train_cmd(cli_config(workspace, save_every_steps=2)))
    assert done.returncode == 0, done.stderr
    return workspace / "checkpoints" / RUN


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_stops_then_the_resume_is_bit_identical(
    tmp_path: Path, reference_run: Path, signum: signal.Signals
) -> None:
    workspace = tmp_path / "ws"
    run_dir = workspace / "checkpoints" / RUN
    config = cli_config(workspace, save_every_steps=2)
    proc = popen(train_cmd(config))
    wait_for(lambda: committed(run_dir, 2), proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # the documented exit status of a run stopped by a signal
    assert "training stopped by a signal; a checkpoint was saved" in err
    results = json.loads(out)
    assert results["status"] == "interrupted"
    assert any(f"stopped by {signum.name}" in m for m in results["messages"])
    stopped_at = results["step"]
    assert 2 <= stopped_at < 12
    newest = list_checkpoints(run_dir)[0][1]
    assert newest.name == f"step-{stopped_at:06d}" and verify(newest)
    assert not temp_folders(run_dir)

    resumed = run(train_cmd(config))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resume_count"] == 1
    assert_same_weights(run_dir / "step-000012", reference_run / "step-000012")
    assert_same_metrics(metrics_lines(run_dir), metrics_lines(reference_run))


def test_time_based_saving_is_on_by_default(tmp_path: Path, make_config) -> None:
    assert TrainingConfig().save_every_seconds > 0
    assert build_config(make_parser().parse_args(["train"])).save_every_seconds > 0
    config = make_config(tmp_path / "ws", epochs=1, steps_per_epoch=8, save_every_seconds=0.001, keep_last=0)
    Trainer(config, progress=False).fit()
    reasons = {step: read_json(p / MANIFEST_NAME, "manifest")["reason"] for step, p in list_checkpoints(config.run_dir)}
    assert reasons.pop(8) == "epoch_end"
    assert reasons and set(reasons.values()) == {"time"}, reasons


# -- corrupted checkpoints ----------------------------------------------------------------
@pytest.mark.parametrize("damaged", CHECKPOINT_FILES)
def test_resume_falls_back_past_a_corrupted_newest_checkpoint_naming_it(
    workspace_copy: Path, trained_workspace: dict, damaged: str
) -> None:
    config = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    newest = config.run_dir / "step-000010"
    path = newest / damaged
    offset = manifest_value_offset(path, "created_at") if damaged == MANIFEST_NAME else path.stat().st_size // 2
    flip_bit(path, offset)
    cheap_check_passes = damaged in (MODEL_FILE, STATE_FILE)  # same size: only the hashes can tell
    if cheap_check_passes:
        cheap_check(newest)
    trainer = Trainer(config, progress=False)
    results = trainer.fit()
    skip = [m for m in trainer.messages if m.startswith("skipping checkpoint")]
    assert len(skip) == 1 and str(newest) in skip[0] and damaged in skip[0], trainer.messages
    assert any("step-000009" in m for m in trainer.messages if m.startswith("resumed from"))
    assert results["completed"] and results["checkpoint_path"] == str(newest)
    verify(newest)  # the damaged folder was replaced by a fresh save of the same step
    reference = trained_workspace["workspace"] / "checkpoints" / RUN / "step-000010"
    assert_same_weights(newest, reference)


@pytest.mark.parametrize("damaged", CHECKPOINT_FILES)
def test_verify_catches_a_single_flipped_bit_in_each_file(workspace_copy: Path, damaged: str) -> None:
    folder = workspace_copy / "checkpoints" / RUN / "step-000010"
    path = folder / damaged
    original = path.read_bytes()
    rng = random.Random(damaged)
    offsets = (
        [manifest_value_offset(path, k) for k in ("created_at", "size_bytes", "step")]
        if damaged == MANIFEST_NAME
        else []
    )
    offsets += [rng.randrange(len(original)) for _ in range(6)] + [0, len(original) - 1]
    for offset in offsets:
        path.write_bytes(original)
        flip_bit(path, offset, rng.randrange(8))
        with pytest.raises(CheckpointCorrupt) as info:
            verify(folder)
        assert info.value.path.startswith(str(folder))
        if damaged != MANIFEST_NAME:  # a flip in the manifest may also read as a bad entry or version
            assert info.value.path == str(path) and damaged in info.value.reason
    # Recovery reads the trainer state and the manifest, so it checks those two files' bytes too.
    if damaged in (TRAINER_FILE, MANIFEST_NAME):
        assert recover(workspace_copy, search_dirs=[])["checkpoint_path"].endswith("step-000009")
    done = (
        run([sys.executable, "-m", "utils.training", "verify", str(workspace_copy)]) if damaged == MODEL_FILE else None
    )
    if done is not None:
        assert done.returncode == 1 and "step-000010" in done.stderr and MODEL_FILE in done.stderr, done.stderr


def test_a_partial_copy_left_by_a_non_atomic_rename_is_never_taken(tmp_path: Path, workspace_copy: Path) -> None:
    """Drive's FUSE mount and network filesystems may show a renamed folder file by file.
    Whatever prefix of the copy is visible (manifest first or last, the last file cut
    short), recovery and resume pass it over; same-size garbage is caught by the hashes."""
    run_dir = workspace_copy / "checkpoints" / RUN
    complete = tmp_path / "complete"
    shutil.move(run_dir / "step-000010", complete)  # step-000009 is now the newest
    partial = run_dir / "step-000011"
    for order in (CHECKPOINT_FILES, tuple(reversed(CHECKPOINT_FILES))):
        for visible in range(len(order)):
            for cut_last in (False, True):
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                for name in order[:visible]:
                    shutil.copyfile(complete / name, partial / name)
                current = order[visible]
                data = (complete / current).read_bytes()
                (partial / current).write_bytes(data[: len(data) // 2] if cut_last else data)
                if (partial / MANIFEST_NAME).exists() and not cut_last and visible == len(order) - 1:
                    continue  # the whole copy is there: a complete checkpoint
                with pytest.raises(CheckpointCorrupt):
                    cheap_check(partial)
                assert recover(workspace_copy, search_dirs=[])["checkpoint_path"].endswith("step-000009")
    # Every file present at its size, one still zeros (written back later by the mount):
    # the cheap check cannot see it, resume's hashes do.
    shutil.rmtree(partial)
    shutil.copytree(complete, partial)
    (partial / MODEL_FILE).write_bytes(bytes((partial / MODEL_FILE).stat().st_size))
    cheap_check(partial)
    with pytest.raises(CheckpointCorrupt, match=MODEL_FILE):
        load_checkpoint(partial)


# -- crash cycles: the metrics log and the experiment database ----------------------------
@pytest.mark.slow
def test_sigkill_right_after_an_epoch_row_leaves_no_phantom_or_duplicate_epochs(tmp_path: Path) -> None:
    """The row of an epoch is appended before its checkpoint commits: a kill in between leaves
    a phantom row that recovery must ignore and the resume must cut, every time."""
    workspace = tmp_path / "ws"
    run_dir = workspace / "checkpoints" / RUN
    config = cli_config(workspace, epochs=4, steps_per_epoch=4)
    resumes = 0
    for _ in range(3):
        resuming = bool(list_checkpoints(run_dir))
        rows_at_start = len(recover(workspace, search_dirs=[])["metrics_history"]) if resuming else 0
        resumes += resuming
        log = run_dir / METRICS_FILE
        inode_at_start = log.stat().st_ino if log.exists() else None

        def new_row_appended(n: int = rows_at_start, inode: int | None = inode_at_start, log: Path = log) -> bool:
            # The resume replaces the log (a new inode) cut back to n rows; then a row is appended.
            try:
                return (inode is None or log.stat().st_ino != inode) and len(metrics_lines(run_dir)) > n
            except (OSError, ValueError):
                return False

        proc = popen(train_cmd(config))
        wait_for(new_row_appended, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        history = recover(workspace, search_dirs=[])["metrics_history"] if list_checkpoints(run_dir) else []
        epochs = [r["epoch"] for r in history]
        assert epochs == list(range(1, len(epochs) + 1))
        with ExperimentDB(workspace / "experiments.db") as db:
            assert [r["name"] for r in db.list_runs()] == [RUN]
            assert db.find_run(RUN)["status"] == "running"  # a killed process cannot say more
    resumes += bool(list_checkpoints(run_dir))
    done = run(train_cmd(config))
    assert done.returncode == 0, done.stderr
    lines = metrics_lines(run_dir)
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert lines == recover(workspace, search_dirs=[])["metrics_history"]
    with ExperimentDB(workspace / "experiments.db") as db:
        (only,) = db.list_runs()
        assert only["id"] == read_json(run_dir / "run.json", "run.json")["run_id"]
        assert only["status"] == "completed" and only["resume_count"] == resumes


@pytest.fixture
def sigterm_harmless():
    """Should a SIGTERM sent to this process land outside the trainer's handler, it must not end pytest."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_the_database_run_keeps_its_id_across_resumes_with_count_and_status(
    tmp_path: Path, make_config, sigterm_harmless: None
) -> None:
    config = make_config(tmp_path / "ws", epochs=2, steps_per_epoch=6, save_every_steps=2, keep_last=0)

    def stop_after(step: int) -> threading.Thread:
        def send() -> None:
            wait_for(lambda: committed(config.run_dir, step), timeout_s=60)
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: stop at the next step

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        return thread

    def db_run() -> dict:
        with ExperimentDB(config.db_path) as db:
            runs = db.list_runs()
        assert len(runs) == 1
        return runs[0]

    sender = stop_after(2)
    first = Trainer(config, progress=False).fit()
    sender.join()
    assert first["status"] == "interrupted"
    run_id = first["run_id"]
    assert db_run()["id"] == run_id and db_run()["status"] == "interrupted" and db_run()["resume_count"] == 0

    second = Trainer(config, progress=False).fit()
    assert second["status"] == "completed" and second["run_id"] == run_id and second["resume_count"] == 1
    row = db_run()
    assert (row["id"], row["status"], row["resume_count"]) == (run_id, "completed", 1)
    assert row["finished_at"] is not None
    with ExperimentDB(config.db_path) as db:
        frame = db.metrics_frame(run_id)
    assert frame["epoch"].tolist() == [1, 2] and frame["step"].tolist() == [6, 12]


# -- one writer per run -------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    run_dir = workspace / "checkpoints" / RUN
    config = cli_config(workspace, epochs=2, steps_per_epoch=400, save_every_steps=5)
    first = popen(train_cmd(config))
    try:
        wait_for(lambda: committed(run_dir, 5), first)
        second = run(train_cmd(config), timeout=120)
        assert second.returncode == 1
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith("error: run folder") and f"pid {first.pid}" in line and "another process" in line
        assert first.poll() is None, "the first trainer must be unaffected"
        assert lock_pid(run_dir) == first.pid
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130
    for _, path in list_checkpoints(run_dir):
        verify(path)


def test_a_lock_left_by_a_sigkilled_process_is_taken_over(tmp_path: Path, make_config) -> None:
    config = make_config(tmp_path / "ws", epochs=1, steps_per_epoch=3)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from utils.training.engine.runlock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(config.run_dir)],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    from utils.training.engine.runlock import RunLock, RunLocked

    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        RunLock(config.run_dir).acquire()
    holder.kill()
    holder.wait(timeout=30)
    holder.stdout.close()
    assert lock_pid(config.run_dir) == holder.pid  # the dead holder's record is still there
    trainer = Trainer(config, progress=False)
    assert trainer.fit()["status"] == "completed"
    assert any("took over the lock" in m for m in trainer.messages)


# -- write failures -----------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 24 MB filesystem mounted as `<tmp_path>/ws/checkpoints`: the checkpoints fill it, the
    workspace's database stays outside (a full disk for the database is another failure)."""
    mount_point = tmp_path / "ws" / "checkpoints"
    mount_point.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs to fill ({done.stderr.decode().strip()}): needs root in a container that allows mount"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def keep_disk_full(mount_point: Path, leave_bytes: int, first_save_done, stop: threading.Event) -> None:
    """Once the first checkpoints are in, keep the filesystem full but for `leave_bytes`: room
    for a metrics row, never for a checkpoint (~1.5 MB). It never takes that last room itself."""
    while not first_save_done():
        if stop.wait(0.002):
            return
    with open(mount_point / "filler", "ab", buffering=0) as f:
        while not stop.is_set():
            fs = os.statvfs(mount_point)
            extra = fs.f_bavail * fs.f_frsize - leave_bytes
            if extra > 0:
                try:
                    f.write(b"\0" * extra)
                except OSError:
                    pass  # something else took the room first
            stop.wait(0.001)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("on_save_error", ["stop", "continue"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
    small_tmpfs: Path, make_config, on_save_error: str, async_save: bool
) -> None:
    config = make_config(
        small_tmpfs.parent,
        epochs=2,
        steps_per_epoch=6,
        save_every_steps=1,
        keep_last=0,
        on_save_error=on_save_error,
        async_save=async_save,
    )
    stop = threading.Event()
    filler_thread = threading.Thread(
        target=keep_disk_full, args=(small_tmpfs, 256 * 1024, lambda: committed(config.run_dir, 2), stop), daemon=True
    )
    filler_thread.start()
    trainer = Trainer(config, progress=False)
    if on_save_error == "stop":
        with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
            trainer.fit()
        assert "the previous checkpoints are intact" in str(info.value)
    else:
        results = trainer.fit()
        assert results["status"] == "completed" and results["step"] < 12
        assert trainer.save_errors and all("No space left on device" in e for e in trainer.save_errors)
        assert any("training continues" in m for m in trainer.messages)
    stop.set()
    filler_thread.join(timeout=60)
    assert not temp_folders(config.run_dir), "a failed save must remove its temporary folder"
    checkpoints = list_checkpoints(config.run_dir)
    assert checkpoints
    for _, path in checkpoints:
        verify(path)
    (small_tmpfs / "filler").unlink()
    assert Trainer(config, progress=False).fit()["completed"]  # with room again, the run finishes


@pytest.mark.slow
def test_a_file_size_limit_hit_during_a_save_stops_cleanly(tmp_path: Path) -> None:
    """An I/O error from the kernel (EFBIG past RLIMIT_FSIZE, set on the running process):
    the save fails, the previous checkpoint stays intact, the temp folder is removed."""
    workspace = tmp_path / "ws"
    run_dir = workspace / "checkpoints" / RUN
    proc = popen(train_cmd(cli_config(workspace, epochs=2, steps_per_epoch=200, save_every_steps=2)))
    wait_for(lambda: committed(run_dir, 2), proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))  # weights are ~0.5 MB
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "save failed" in line and "File too large" in line and "previous checkpoints are intact" in line
    assert not temp_folders(run_dir)
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints
    for _, path in checkpoints:
        verify(path)
    assert recover(workspace, search_dirs=[])["checkpoint_path"] == str(checkpoints[0][1])
