"""Recovery benchmarks: recover() against loading every checkpoint, the bytes it reads, and large trees."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from utils.training.config import TrainingConfig
from utils.training.engine.checkpoint import list_checkpoints, load_checkpoint, step_dir_name
from utils.training.engine.recovery import METRICS_FILE, RUN_FILE, recover
from utils.training.engine.trainer import Trainer

from .common import bytes_read_by_process, entry, folder_bytes, median

# Files opened while an OpenRecorder is active; the audit hook stays installed (it cannot be
# removed) but records nothing outside one.
_recording: list[str] | None = None
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    if _recording is None or event != "open":
        return
    path, mode, flags = args
    reading = ("r" in mode or "+" in mode) if isinstance(mode, str) else (flags or 0) & os.O_ACCMODE != os.O_WRONLY
    if isinstance(path, (str, bytes, os.PathLike)) and reading:
        _recording.append(os.fsdecode(path))


class OpenRecorder:
    """Every file opened for reading (builtins.open, io.open, os.open) while active, via the
    interpreter's audit hook, and the process's read() byte count (/proc/self/io rchar)."""

    def __enter__(self) -> OpenRecorder:
        global _recording, _hook_installed
        if not _hook_installed:
            sys.addaudithook(_audit)
            _hook_installed = True
        self.paths: list[str] = []
        self._rchar = bytes_read_by_process()
        _recording = self.paths
        return self

    def __exit__(self, *exc: object) -> None:
        global _recording
        _recording = None
        end = bytes_read_by_process()
        self.rchar = None if end is None or self._rchar is None else end - self._rchar

    def opened_file_bytes(self) -> int:
        total = 0
        for path in self.paths:
            try:
                if os.path.isfile(path):
                    total += os.stat(path).st_size
            except OSError:
                pass
        return total


def train_every_step_run(workspace: Path, steps: int) -> Path:
    """A real run of the tiny preset with a checkpoint after every step, all kept."""
    epochs = 2 if steps >= 2 else 1
    config = TrainingConfig.from_preset(
        "tiny", workspace_root=str(workspace), run_name="every-step", epochs=epochs,
        steps_per_epoch=max(1, steps // epochs), save_every_steps=1, save_every_seconds=0, keep_last=0, device="cpu",
    )  # fmt: skip
    Trainer(config, resume="never", progress=False).fit()
    return config.run_dir


def _link_tree(source: Path, target: Path) -> None:
    """Copy a checkpoint folder as hard links (same bytes, no data copied); plain copies where
    the filesystem has no hard links."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)


def build_run_tree(template_run: Path, run_dir: Path, checkpoints: int) -> None:
    newest = list_checkpoints(template_run)[0][1]
    run_dir.mkdir(parents=True)
    for name in (RUN_FILE, METRICS_FILE):
        if (template_run / name).exists():
            shutil.copy2(template_run / name, run_dir / name)
    for step in range(1, checkpoints + 1):
        _link_tree(newest, run_dir / step_dir_name(step))


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_recovery(workdir: Path, checkpoints: int, repeats: int, scale: tuple[int, int, int]) -> dict[str, Any]:
    """recover_vs_naive, recover_bytes_read and recover_at_scale."""
    workspace = workdir / "every-step"
    run_dir = train_every_step_run(workspace, checkpoints)
    found = list_checkpoints(run_dir)

    def do_recover(where: Path) -> dict[str, Any]:
        return recover(where, search_dirs=[])

    def naive() -> None:
        for _, path in found:
            load_checkpoint(path)

    do_recover(workspace)  # warm-up: imports and directory caches on both sides
    naive()
    recover_times, naive_times = [], []
    for r in range(repeats):
        pair = [("recover", lambda: do_recover(workspace)), ("naive", naive)]
        for name, fn in pair if r % 2 == 0 else reversed(pair):
            (recover_times if name == "recover" else naive_times).append(_time(fn))
    with OpenRecorder() as opened:
        results = do_recover(workspace)
    on_disk = folder_bytes(run_dir)
    rec, nai = median(recover_times), median(naive_times)

    one_run_checkpoints, runs, per_run = scale
    one_run_ws = workdir / "one-run"
    build_run_tree(run_dir, one_run_ws / "checkpoints" / "big", one_run_checkpoints)
    many_ws = workdir / "many-runs"
    for i in range(runs):
        build_run_tree(run_dir, many_ws / "checkpoints" / f"run-{i:02d}", per_run)
    do_recover(one_run_ws)
    do_recover(many_ws)
    one_times = [_time(lambda: do_recover(one_run_ws)) for _ in range(repeats)]
    many_times = [_time(lambda: do_recover(many_ws)) for _ in range(repeats)]
    worst = max(median(one_times), median(many_times))

    read_bytes = opened.opened_file_bytes()
    return {
        "recover_vs_naive": entry(
            rec / nai,
            "<=",
            0.01,
            recover_seconds=rec,
            naive_load_all_seconds=nai,
            checkpoints=len(found),
            checkpoint_path=Path(results["checkpoint_path"]).name,
            repeats=repeats,
            method="recover(workspace, search_dirs=[]) against load_checkpoint() (verify + load) of every "
            "checkpoint of the same run, a real tiny-preset run with a checkpoint after every step; "
            "interleaved, medians, page cache warm for both",
        ),  # fmt: skip
        "recover_bytes_read": entry(
            read_bytes / on_disk,
            "<=",
            0.03,
            bytes_read=read_bytes,
            bytes_on_disk=on_disk,
            rchar_bytes=opened.rchar,
            files_opened=[os.path.relpath(p, workspace) for p in opened.paths],
            method="bytes_read = sum of os.stat sizes of every file recover() opened for reading (audit hook "
            "on open events; an upper bound, as it reads whole files); rchar_bytes = /proc/self/io rchar "
            "delta over the same call (bytes returned by every read() syscall of the process); "
            "bytes_on_disk = every file of the run folder",
        ),  # fmt: skip
        "recover_at_scale": entry(
            worst,
            "<=",
            1.0,
            one_run_seconds=median(one_times),
            one_run_checkpoints=one_run_checkpoints,
            many_runs_seconds=median(many_times),
            runs=runs,
            checkpoints_per_run=per_run,
            method="ratio = the slower median in seconds; trees built by hard-linking one checkpoint folder",
        ),  # fmt: skip
    }
