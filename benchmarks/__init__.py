"""The benchmark suite: every performance target of the engine as a ratio of two things measured side by side.

`python -m benchmarks` runs the full suite; `python -m benchmarks --quick --json` the quick
one (a few minutes on two CPU cores), printing a table on stderr and one JSON object on stdout.
Each key holds `{"ratio": <median>, "min", "median", "max", "target": "<= 0.05", "met": bool,
"method": "...", ...raw figures}`, min and max over the per-round paired ratios.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import FULL, QUICK, SMOKE, Sizes, format_table

__all__ = ["FULL", "GROUPS", "QUICK", "SMOKE", "Sizes", "format_table", "run_suite"]

GROUPS = ("save", "loop_cost", "memory", "recovery", "loop", "db")


def _group_runners(sizes: Sizes) -> dict[str, Callable[[Path], dict[str, Any]]]:
    from .database import bench_db
    from .loop import bench_loop
    from .loop_cost import bench_async_loop
    from .recovery import bench_recovery
    from .saving import bench_save, bench_save_peak_rss

    return {
        "save": lambda d: bench_save(d, sizes.save_state_mib, sizes.save_layer_width, sizes.save_repeats),
        "loop_cost": lambda d: bench_async_loop(
            d,
            sizes.save_state_mib,
            sizes.save_layer_width,
            sizes.loop_cost_steps,
            sizes.loop_cost_saves,
            sizes.loop_cost_repeats,
            sizes.loop_cost_batch,
        ),
        "memory": lambda d: bench_save_peak_rss(d, sizes.save_state_mib, sizes.save_layer_width),
        "recovery": lambda d: bench_recovery(
            d,
            sizes.every_step_checkpoints,
            sizes.recover_repeats,
            sizes.recover_larger_preset,
            (sizes.scale_checkpoints, sizes.scale_runs, sizes.scale_checkpoints_per_run),
        ),
        "loop": lambda d: bench_loop(
            d, sizes.loop_steps_per_epoch, sizes.loop_epochs, sizes.loop_repeats, sizes.checkpoint_every_steps
        ),
        "db": lambda d: bench_db(d, sizes.db_points, sizes.db_repeats),
    }


def run_suite(
    sizes: Sizes,
    *,
    workdir: Path | None = None,
    groups: tuple[str, ...] = GROUPS,
    threads: int = 1,
    on_group_done: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Run the chosen groups in `workdir` (a fresh temporary folder by default, removed after)
    and return every result entry plus `meta` (machine, sizes, seconds per group)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {unknown}; choose from {list(GROUPS)}")
    torch.set_num_threads(threads)
    runners = _group_runners(sizes)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-", dir=workdir) as tmp:
        for group in groups:
            start = time.perf_counter()
            group_dir = Path(tmp) / group
            group_dir.mkdir()
            results.update(runners[group](group_dir))
            seconds[group] = round(time.perf_counter() - start, 2)
            if on_group_done is not None:
                on_group_done(group, seconds[group])
    results["meta"] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": _cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "sizes": sizes.as_dict(),
        "group_seconds": seconds,
        "all_met": all(v["met"] for v in results.values() if isinstance(v, dict) and "met" in v),
        # A ratio past its physical limit means the two sides did not do the same work: the run fails.
        "beyond_physical_limit": sorted(
            k for k, v in results.items() if isinstance(v, dict) and v.get("beyond_physical_limit")
        ),
    }
    return results


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()
