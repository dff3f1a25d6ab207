"""Shared parts of the benchmark suite: sizes, timing, memory readings, result entries and the table."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sizes:
    """How big and how often each benchmark runs. QUICK fits in 5 minutes on two CPU cores."""

    save_state_mib: float  # weights + AdamW moments of the state saved by the save benchmarks
    save_layer_width: int  # width of the Linear layers that make up that state
    save_repeats: int  # interleaved (async, sync, raw write) rounds
    loop_cost_steps: int  # steps of one loop segment of async_loop_cost_ratio (equal with and without saves)
    loop_cost_saves: int  # async saves in the segment with saves, loop_cost_steps / loop_cost_saves apart
    loop_cost_repeats: int  # interleaved rounds; short segments, many rounds: a pair sees the same load
    loop_cost_batch: int  # rows of the batch that the Linear stack trains on
    every_step_checkpoints: int  # steps (one checkpoint each) of the run recover() is measured on
    recover_repeats: int
    recover_larger_preset: str  # a model of the size a user trains, measured beside recover_vs_load_newest
    scale_checkpoints: int  # checkpoints in the one-run tree
    scale_runs: int  # runs in the many-runs tree
    scale_checkpoints_per_run: int
    loop_steps_per_epoch: int
    loop_epochs: int
    loop_repeats: int  # lockstep rounds of (plain, engine, engine + checkpoints, engine again); 9: a 96 % median CI
    checkpoint_every_steps: int  # N of checkpoint_overhead
    db_points: int
    db_repeats: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Sizes(
    save_state_mib=64, save_layer_width=1024, save_repeats=15,
    loop_cost_steps=24, loop_cost_saves=3, loop_cost_repeats=21, loop_cost_batch=32,
    every_step_checkpoints=40, recover_repeats=7, recover_larger_preset="base",
    scale_checkpoints=1000, scale_runs=20, scale_checkpoints_per_run=50,
    loop_steps_per_epoch=100, loop_epochs=2, loop_repeats=9, checkpoint_every_steps=50,
    db_points=100_000, db_repeats=3,
)  # fmt: skip
FULL = Sizes(
    save_state_mib=256, save_layer_width=1024, save_repeats=7,
    loop_cost_steps=40, loop_cost_saves=4, loop_cost_repeats=21, loop_cost_batch=32,
    every_step_checkpoints=100, recover_repeats=11, recover_larger_preset="base",
    scale_checkpoints=1000, scale_runs=20, scale_checkpoints_per_run=1000,
    loop_steps_per_epoch=250, loop_epochs=2, loop_repeats=9, checkpoint_every_steps=50,
    db_points=100_000, db_repeats=7,  # the targets are defined for a 100k-point run
)  # fmt: skip
SMOKE = Sizes(
    save_state_mib=1, save_layer_width=128, save_repeats=1,
    loop_cost_steps=4, loop_cost_saves=2, loop_cost_repeats=1, loop_cost_batch=4,
    every_step_checkpoints=4, recover_repeats=1, recover_larger_preset="tiny",
    scale_checkpoints=5, scale_runs=3, scale_checkpoints_per_run=2,
    loop_steps_per_epoch=3, loop_epochs=1, loop_repeats=1, checkpoint_every_steps=2,
    db_points=500, db_repeats=1,
)  # fmt: skip


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def median_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median: the order statistics [x_(j), x_(n+1-j)]
    with the largest j whose binomial coverage, 1 - 2 P(Binomial(n, 1/2) < j), is at least
    `confidence`. None when even [min, max] covers less (fewer than 6 values at 95 %)."""
    xs = sorted(values)
    n = len(xs)
    below, best = 0.0, None  # below = P(B <= j - 1)
    for j in range(1, n // 2 + 1):
        below += math.comb(n, j - 1) / 2**n
        if 1 - 2 * below < confidence:
            break
        best = j
    return None if best is None else (xs[best - 1], xs[n - best])


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def entry(
    samples: Iterable[float],
    op: str,
    target: float,
    *,
    method: str,
    physical_limit: float | None = None,
    note: str = "",
    **raw: Any,
) -> dict[str, Any]:
    """One result: `ratio` is the median of the per-round paired ratios in `samples`, with their
    min and max and a 95 % confidence interval of the median (`median_ci95`, None under 6 rounds);
    the target ("<=" or ">="); whether it is met; how it was measured; the raw figures.

    `physical_limit`: the value that no honest measurement can pass (1.0 for a save against the
    raw disk doing the same writes). A median more than 10 % past it means the two sides did not
    do the same work: the entry is not met and says so (`beyond_physical_limit`), and the run fails."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("a benchmark entry needs at least one sample")
    ratio = median(values)
    met = ratio <= target if op == "<=" else ratio >= target
    beyond = physical_limit is not None and (
        ratio > physical_limit * 1.1 if op == ">=" else ratio < physical_limit / 1.1
    )
    result: dict[str, Any] = {
        "ratio": rounded(ratio),
        "min": rounded(min(values)),
        "median": rounded(ratio),
        "max": rounded(max(values)),
        "median_ci95": rounded(list(interval)) if (interval := median_interval(values)) else None,
        "target": f"{op} {target:g}",
        "met": bool(met and not beyond),
        "method": method,
        "rounds": len(values),
    }
    if beyond:
        result["beyond_physical_limit"] = True
        note = (note + "; " if note else "") + (
            f"median {ratio:.3g} is more than 10 % past the physical limit {physical_limit:g}: the two sides "
            "do not do the same work; this fails the run until it is explained"
        )
    if note:
        result["note"] = note
    result.update(rounded(raw))
    return result


def folder_bytes(path: Path) -> int:
    """Sum of the sizes of every regular file under `path`."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted while we walked (retention of a running save)
    return total


# -- memory and I/O counters of this process (Linux /proc; None elsewhere) ------------------
def proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM (the peak resident set) so that the next reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bytes_read_by_process() -> int | None:
    """`rchar` of /proc/self/io: bytes this process received from read() calls, cached or not."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- the table ------------------------------------------------------------------------------
_HEADLINE = {
    "async_stall_ratio": ("stall_seconds", "sync_save_seconds"),
    "async_loop_cost_ratio": ("loop_seconds_lost_per_save", "sync_save_seconds"),
    "save_resident_ratio": ("resident_mib", "state_mib"),
    "recover_vs_load_newest": ("recover_seconds", "load_newest_seconds"),
    "recover_cold_vs_torch_import": ("recover_cold_seconds", "torch_import_seconds"),
    "save_vs_disk": ("save_mb_per_second", "raw_write_mb_per_second"),
    "save_peak_rss_ratio": ("peak_extra_mib", "state_mib"),
    "recover_vs_naive": ("recover_seconds", "naive_load_all_seconds"),
    "recover_at_scale": ("one_run_seconds", "many_runs_seconds"),
    "recover_bytes_read": ("bytes_read", "bytes_on_disk"),
    "loop_vs_plain": ("engine_tokens_per_second", "plain_tokens_per_second"),
    "checkpoint_overhead": ("with_checkpoints_tokens_per_second", "without_tokens_per_second"),
    "db_points_per_second": ("points_per_second", "raw_sqlite_points_per_second"),
    "db_metrics_frame_seconds": ("seconds", "points"),
}


def format_table(results: dict[str, Any]) -> str:
    """A markdown table of every result entry: median ratio, min-max over the rounds, the median's 95 %
    confidence interval, target, met, and the two headline figures."""
    lines = [
        "| metric | ratio (median) | min – max | median, 95 % CI | target | met | measured side by side |",
        "|---|---:|---:|---:|---|:---:|---|",
    ]
    for key, value in results.items():
        if not isinstance(value, dict) or "ratio" not in value:
            continue
        figures = _HEADLINE.get(key, ())
        detail = ", ".join(f"{name} {value[name]:g}" for name in figures if isinstance(value.get(name), (int, float)))
        met = (
            "yes" if value["met"] else ("NO: beyond the physical limit" if value.get("beyond_physical_limit") else "NO")
        )
        ci = value.get("median_ci95")
        interval = f"{ci[0]:.3g} – {ci[1]:.3g}" if ci else "–"
        lines.append(
            f"| `{key}` | {value['ratio']:.4g} | {value['min']:.3g} – {value['max']:.3g} | {interval} | "
            f"{value['target']} | {met} | {detail} |"
        )
    return "\n".join(lines)
