"""`python -m benchmarks [--quick] [--json]`: run the suite, print the table on stderr and, with --json, the results on stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import FULL, GROUPS, QUICK, format_table, run_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under 5 minutes on two CPU cores")
    parser.add_argument("--json", action="store_true", help="print one JSON object of every result on stdout")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {','.join(GROUPS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on both sides (default 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder (default: $TMPDIR)")
    args = parser.parse_args(argv)
    groups = tuple(g.strip() for g in args.only.split(",") if g.strip())
    if args.workdir is not None and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir}: no such folder; create it or leave the option out")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be 1 or more")
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()

    def progress(group: str, seconds: float) -> None:
        print(f"[benchmarks] {group} done in {seconds:.1f} s", file=sys.stderr, flush=True)

    try:
        results = run_suite(sizes, workdir=args.workdir, groups=groups, threads=args.threads, on_group_done=progress)
    except ValueError as exc:
        parser.error(str(exc))
    meta = results["meta"]
    print(
        f"\n{'quick' if args.quick else 'full'} suite, {meta['cpu_count']} CPUs, torch {meta['torch']}, "
        f"{args.threads} torch thread(s), {time.perf_counter() - start:.0f} s\n",
        file=sys.stderr,
    )
    print(format_table(results), file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1))
    if meta["beyond_physical_limit"]:
        print(
            f"FAILED: {', '.join(meta['beyond_physical_limit'])} beat the physical limit by more than 10 %: the "
            "two sides of the comparison do not do the same work; fix the baseline or explain it",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
