"""Recovery benchmarks: recover() against loading every checkpoint, the bytes it reads, and large trees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from utils.training.config import TrainingConfig
from utils.training.engine.checkpoint import list_checkpoints, load_checkpoint, step_dir_name
from utils.training.engine.checkpoint_index import INDEX_FILE
from utils.training.engine.commit import (
    MANIFEST_HASH_KEY,
    MANIFEST_NAME,
    bytes_digest,
    read_manifest,
    write_manifest,
)
from utils.training.engine.metrics_log import STEPS_FILE
from utils.training.engine.recovery import METRICS_FILE, RUN_FILE, recover
from utils.training.engine.trainer import Trainer
from utils.training.engine.trainer_state import TRAINER_FILE

from .common import bytes_read_by_process, entry, folder_bytes, median
from .saving import MIB

REPO_ROOT = Path(__file__).resolve().parent.parent

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


def train_every_step_run(workspace: Path, steps: int, preset: str = "tiny", **overrides: Any) -> Path:
    """A real run of `preset` with a checkpoint after every step, all kept."""
    epochs = 2 if steps >= 2 else 1
    config = TrainingConfig.from_preset(
        preset, workspace_root=str(workspace), run_name="every-step", epochs=epochs,
        steps_per_epoch=max(1, steps // epochs), save_every_steps=1, save_every_seconds=0, keep_last=0, device="cpu",
        **overrides,
    )  # fmt: skip
    Trainer(config, resume="never", progress=False).fit()
    return config.run_dir


def _read(path: str) -> bytes:
    """A file's bytes by the fewest system calls: open, read to the end, close."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def minimal_reads(run_dir: Path) -> None:
    """The floor under any recovery of `run_dir` that ranks its checkpoints exactly and checks what it
    returns: the reads that cannot be skipped, written straight, with no checks, no fallbacks and no
    results dict. List the checkpoints folder and the run folder, parse the index, stat every manifest
    (an index entry is only good while its manifest is unchanged), read the newest manifest and hash
    it (its seal), stat its files, read trainer_state.json and hash it, read run.json and steps.jsonl."""
    run = str(run_dir)
    with os.scandir(os.path.dirname(run)) as runs:
        [entry.name for entry in runs]
    with os.scandir(run) as listing:
        names = [entry.name for entry in listing]
    index = json.loads(_read(os.path.join(run, INDEX_FILE)))["entries"]
    for name in names:
        if name.startswith("step-"):
            os.lstat(os.path.join(run, name, MANIFEST_NAME))
    folder = os.path.join(run, max(index, key=lambda name: index[name]["saved_at"]))
    raw = _read(os.path.join(folder, MANIFEST_NAME))
    bytes_digest(raw)
    for name in json.loads(raw)["files"]:
        os.lstat(os.path.join(folder, name))
    raw = _read(os.path.join(folder, TRAINER_FILE))
    bytes_digest(raw)
    json.loads(raw)
    json.loads(_read(os.path.join(run, RUN_FILE)))
    [json.loads(line) for line in _read(os.path.join(run, STEPS_FILE)).splitlines()]


def _link_tree(source: Path, target: Path, step: int) -> None:
    """Copy a checkpoint folder as hard links (same bytes, no data copied; plain copies where the
    filesystem has no hard links), with its own manifest naming `step`, as its folder name says
    (recovery skips a folder whose name and manifest disagree)."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name == MANIFEST_NAME:
            continue
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)
    manifest = read_manifest(source)
    fields = {k: v for k, v in manifest.items() if k not in ("format_version", "hash_algorithm", "created_at", "files",
                                                              MANIFEST_HASH_KEY)}  # fmt: skip
    write_manifest(target, manifest["files"], **{**fields, "step": step})


def build_run_tree(template_run: Path, run_dir: Path, checkpoints: int) -> None:
    newest = list_checkpoints(template_run)[0][1]
    run_dir.mkdir(parents=True)
    for name in (RUN_FILE, METRICS_FILE):
        if (template_run / name).exists():
            shutil.copy2(template_run / name, run_dir / name)
    for step in range(1, checkpoints + 1):
        _link_tree(newest, run_dir / step_dir_name(step), step)


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(repeats: int, sides: dict[str, Any]) -> dict[str, list[float]]:
    """Each side timed once per round, in rotating order."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_time(sides[name]))
    return times


def bench_recovery(
    workdir: Path, checkpoints: int, repeats: int, larger_preset: str, scale: tuple[int, int, int]
) -> dict[str, Any]:
    """recover_vs_naive, recover_vs_load_newest, recover_cold_vs_torch_import, recover_bytes_read
    and recover_at_scale."""
    workspace = workdir / "every-step"
    run_dir = train_every_step_run(workspace, checkpoints)
    found = list_checkpoints(run_dir)
    # Beside the verdict (the tiny run), the same pair on a model of the size a user trains: one row
    # per batch so that two CPU cores train it in seconds (the state, so the checkpoint, is the preset's).
    larger_ws = workdir / larger_preset
    larger_newest = list_checkpoints(train_every_step_run(larger_ws, 2, larger_preset, batch_size=1,
                                                          eval_batches=1))[0][1]  # fmt: skip

    def do_recover(where: Path = workspace) -> dict[str, Any]:
        return recover(where, search_dirs=[])

    def naive() -> None:
        for _, path in found:
            load_checkpoint(path)

    # The same run without its index (as a copy by hand, or an older version, leaves it). Copied, not
    # hard-linked: a new link changes the ctime of the original manifests, which voids their index entries.
    unindexed = workdir / "unindexed"
    shutil.copytree(workspace, unindexed)
    (unindexed / run_dir.relative_to(workspace) / INDEX_FILE).unlink()

    sides = {
        "recover": do_recover,
        "naive": naive,
        "newest": lambda: load_checkpoint(found[0][1]),
        "unindexed": lambda: do_recover(unindexed),
        "floor": lambda: minimal_reads(run_dir),
        "larger_recover": lambda: do_recover(larger_ws),
        "larger_newest": lambda: load_checkpoint(larger_newest),
    }
    for warm in sides.values():  # imports and directory caches on every side
        warm()
    times = _interleaved(repeats, sides)
    with OpenRecorder() as opened:
        results = do_recover()
    cold = cold_recover_rounds(workspace, repeats)
    on_disk = folder_bytes(run_dir)
    rec, nai, newest = (median(times[k]) for k in ("recover", "naive", "newest"))
    pairs = list(zip(times["recover"], times["naive"], times["newest"], strict=True))
    entries = {
        "recover_vs_naive": entry(
            [r / n for r, n, _ in pairs],
            "<=",
            0.01,
            recover_seconds=rec,
            naive_load_all_seconds=nai,
            checkpoints=len(found),
            checkpoint_path=Path(results["checkpoint_path"]).name,
            repeats=repeats,
            method="per round: recover(workspace, search_dirs=[]) / load_checkpoint() (verify + load) of every "
            "checkpoint of the same run (a real tiny-preset run with a checkpoint after every step). Kept from "
            "earlier versions; it flatters recovery: recover_vs_load_newest is the honest comparison",
        ),  # fmt: skip
        "recover_vs_load_newest": entry(
            [r / w for r, _, w in pairs],
            "<=",
            0.05,
            recover_seconds=rec,
            load_newest_seconds=newest,
            recover_without_index_seconds=median(times["unindexed"]),
            checkpoints=len(found),
            checkpoint_mib=folder_bytes(found[0][1]) / MIB,
            recover_samples=times["recover"],
            load_newest_samples=times["newest"],
            floor_seconds=median(times["floor"]),
            floor_ratio=median(f / w for f, w in zip(times["floor"], times["newest"], strict=True)),
            larger_preset=larger_preset,
            larger_checkpoint_mib=folder_bytes(larger_newest) / MIB,
            larger_recover_seconds=median(times["larger_recover"]),
            larger_load_newest_seconds=median(times["larger_newest"]),
            larger_ratio=median(r / w for r, w in zip(times["larger_recover"], times["larger_newest"], strict=True)),
            repeats=repeats,
            method="per round: recover(workspace, search_dirs=[]) (ranks the checkpoints through the run's "
            "index, cheap-checks the newest, reads its metadata and the run's logs) / load_checkpoint() of the "
            "newest checkpoint once (hash check + load), on the tiny-preset run of recover_vs_naive; interleaved "
            "in rotating order, page cache warm on every side. floor_seconds: benchmarks.recovery.minimal_reads "
            "on the same run, the reads no exact recovery can skip, done straight (it opens the files recover() "
            "opens); floor_ratio above the target means no implementation meets it on this run. larger_*: the "
            "same pair on a real run of the larger_preset (the size of model a user trains; one row per batch, "
            "which leaves the checkpoint as it is), beside the verdict, not in it. recover_without_index_seconds: "
            "a copy of the tiny run without its index (every manifest read)",
        ),  # fmt: skip
        "recover_cold_vs_torch_import": cold,
        "recover_bytes_read": entry(
            [opened.opened_file_bytes() / on_disk],
            "<=",
            0.03,
            bytes_read=opened.opened_file_bytes(),
            bytes_on_disk=on_disk,
            rchar_bytes=opened.rchar,
            files_opened=[os.path.relpath(p, workspace) for p in opened.paths],
            method="bytes_read = sum of os.stat sizes of every file recover() opened for reading (audit hook "
            "on open events; an upper bound, as it reads whole files); rchar_bytes = /proc/self/io rchar "
            "delta over the same call; bytes_on_disk = every file of the run folder",
        ),  # fmt: skip
    }
    entries["recover_at_scale"] = _recover_at_scale(workdir, run_dir, repeats, scale, do_recover)
    return entries


def _recover_at_scale(
    workdir: Path, run_dir: Path, repeats: int, scale: tuple[int, int, int], do_recover: Any
) -> dict[str, Any]:
    one_run_checkpoints, runs, per_run = scale
    one_run_ws = workdir / "one-run"
    build_run_tree(run_dir, one_run_ws / "checkpoints" / "big", one_run_checkpoints)
    many_ws = workdir / "many-runs"
    for i in range(runs):
        build_run_tree(run_dir, many_ws / "checkpoints" / f"run-{i:02d}", per_run)
    times = _interleaved(repeats, {"one": lambda: do_recover(one_run_ws), "many": lambda: do_recover(many_ws)})
    return entry(
        [max(a, b) for a, b in zip(times["one"], times["many"], strict=True)], "<=", 1.0,
        one_run_seconds=median(times["one"]), one_run_checkpoints=one_run_checkpoints,
        many_runs_seconds=median(times["many"]), runs=runs, checkpoints_per_run=per_run,
        method="per round: the slower of the two recover() calls, in seconds; trees built by hard-linking one "
        "checkpoint folder, without an index (the worst case: every manifest is read)",
    )  # fmt: skip


def cold_recover_rounds(workspace: Path, repeats: int) -> dict[str, Any]:
    """recover_cold_vs_torch_import: `python -m utils.training recover --json` in a fresh process
    against `python -c "import torch"`, interleaved; per round the ratio of the two wall times."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRAINING_DEBUG", None)
    commands = {
        "recover": [sys.executable, "-m", "utils.training", "recover", "--checkpoint-dir", str(workspace), "--json"],
        "torch": [sys.executable, "-c", "import torch"],
    }

    def run(name: str) -> None:
        done = subprocess.run(commands[name], cwd=REPO_ROOT, env=env, capture_output=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(commands[name][1:4])} failed: {done.stderr.decode()[-500:]}")

    for name in ("recover", "torch"):  # warm the page cache of both
        run(name)
    times = _interleaved(repeats, {"recover": lambda: run("recover"), "torch": lambda: run("torch")})
    return entry(
        [r / t for r, t in zip(times["recover"], times["torch"], strict=True)], "<=", 0.5,
        recover_cold_seconds=median(times["recover"]), torch_import_seconds=median(times["torch"]),
        recover_samples=times["recover"], torch_samples=times["torch"],
        method="per round: wall seconds of `python -m utils.training recover --checkpoint-dir WS --json` in a "
        "fresh interpreter / `python -c \"import torch\"` in a fresh interpreter; interleaved (7 rounds quick, 11 full), "
        "page cache warm for both",
    )  # fmt: skip
