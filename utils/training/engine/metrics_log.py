"""metrics.jsonl (one line per completed epoch) and steps.jsonl (one line per logging interval):
appended and fsynced, cut back atomically on resume to the checkpoint's step, read tolerantly (a
torn last line, as a crash mid-append leaves, is ignored)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .commit import CheckpointCorrupt, fsync_dir, read_capped

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
STEP_HISTORY_MAX_ROWS = 5000  # step_history past this is thinned by a uniform stride
MAX_METRICS_BYTES = 256 * 1024 * 1024  # one short line per epoch: far beyond any real run


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace a JSONL file atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_stale_temp_logs(run_dir: Path) -> list[Path]:
    """Delete `.<log>.tmp-PID` files that a process killed before its rename left behind.
    Call it only while holding the run lock (no live writer can own one)."""
    removed = []
    try:
        candidates = [p for p in Path(run_dir).iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    except OSError:
        return removed
    for path in candidates:
        if (
            path.name.split(".tmp-")[0].endswith((".jsonl", ".json", ".snapshot"))
            and path.is_file()
            and not path.is_symlink()
        ):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def read_log_bytes(path: Path, what: str) -> bytes:
    """A log's bytes, b"" when it does not exist; other OSErrors propagate. A file larger than any
    run writes (a foreign or sparse file) is not read: CheckpointCorrupt says so."""
    try:
        raw = read_capped(path, MAX_METRICS_BYTES)
    except FileNotFoundError:
        return b""
    if len(raw) > MAX_METRICS_BYTES:
        raise CheckpointCorrupt(path, f"{Path(path).name} is larger than {MAX_METRICS_BYTES} bytes; not a {what}")
    return raw


def _rows_by(path: Path, key: str, what: str, keep: Any = None) -> list[dict[str, Any]]:
    """The JSON object lines of a log, one per integer `key` value (the last line for it wins), in
    key order. A torn or garbled line, as a crash in the middle of an append leaves, is ignored. A
    file larger than any run writes (a foreign or sparse file) is not read: CheckpointCorrupt says so."""
    rows: dict[int, dict[str, Any]] = {}
    try:
        raw = read_log_bytes(path, what)
    except OSError:
        return []
    for line in raw.splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        value = row.get(key) if isinstance(row, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and (keep is None or keep(value)):
            rows[value] = row
    return [rows[v] for v in sorted(rows)]


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl, one per epoch (the last line for an epoch wins)."""
    return _rows_by(path, "epoch", "metrics log")


class StepsLog:
    """steps.jsonl, open for appending: each line is written and flushed as it comes; `sync()`
    (called before every checkpoint and at the end) fsyncs, so every line up to a checkpoint's
    step is durable when the checkpoint is. Lines past the newest checkpoint are cut by `trim`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def append(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        """fsync and close. The file is closed even when the fsync fails (a full disk); the
        error is raised after."""
        if self._file.closed:
            return
        try:
            self.sync()
        finally:
            try:
                self._file.close()
            except OSError:
                pass  # the buffered lines could not be written: sync() already raised why


def read_steps_log(path: Path, *, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of steps.jsonl in step order (the last line for a step wins), up to `up_to_step`."""
    return _rows_by(path, "step", "steps log", None if up_to_step is None else (lambda step: step <= up_to_step))


def thin_rows(rows: list[dict[str, Any]], max_rows: int = STEP_HISTORY_MAX_ROWS) -> list[dict[str, Any]]:
    """At most about max_rows rows by a uniform stride, always keeping the last one."""
    if len(rows) <= max_rows:
        return rows
    stride = -(-len(rows) // max_rows)
    kept = rows[len(rows) - 1 :: -stride][::-1]
    return kept


def trim_steps_log(path: Path, step: int) -> None:
    """Cut steps.jsonl back to the lines at or before `step` (a resume replays the rest exactly)."""
    if Path(path).exists():
        rewrite_jsonl(Path(path), read_steps_log(path, up_to_step=step))


def drift_history(metrics_history: list[dict]) -> list[dict]:
    """The drift metrics of each epoch, as the dashboard's drift panels take them: derived from
    the metrics rows (which carry them), so the checkpoint stores them once."""
    history = []
    for row in metrics_history:
        drift = {k: v for k, v in row.items() if k.startswith("drift/")}
        if drift:
            history.append({"epoch": row.get("epoch"), "step": row.get("step"), **drift})
    return history
