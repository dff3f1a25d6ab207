"""The CSV export cell: the per-epoch metrics as `<workspace>/results/<run_name>_metrics.csv`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._namespace import check, problem, show_path, text_output

DEFAULT_WORKSPACE = "."


@text_output
def run(ns: dict[str, Any], output: str | None = None) -> None:
    from ..analysis import DEFAULT_RUN_NAME, metrics_frame, write_metrics_csv

    if problem(ns, "metrics_df") is None:
        frame = ns["metrics_df"]
    elif check(ns, ["results"], cell="CSV export"):
        print("metrics_df is missing: using the metrics in `results`.")
        frame = metrics_frame(ns["results"])
    else:
        return
    if len(frame) == 0:
        print("⚪ No completed epoch yet: nothing to export.")
        print("Next: let the Training cell finish an epoch, or recover a run that has one.")
        return
    if problem(ns, "workspace_root") is None:
        workspace = str(ns["workspace_root"])
    else:
        workspace = DEFAULT_WORKSPACE
        print(f"workspace_root is missing: writing under the current folder ({DEFAULT_WORKSPACE}).")
    if problem(ns, "training_config") is None:
        run_name = ns["training_config"].run_name
    else:
        run_name = DEFAULT_RUN_NAME
        print(f"training_config is missing: naming the file after '{DEFAULT_RUN_NAME}'.")
    path = Path(output) if output else Path(workspace) / "results" / f"{run_name}_metrics.csv"
    try:
        written, rows = write_metrics_csv(frame, path)
    except OSError as exc:
        print(f"❌ Could not write {show_path(path)}: {exc}")
        print("Next: check the workspace is writable (or pass another output path) and re-run this cell.")
        return
    ns["csv_path"] = str(written)
    print(f"✅ {rows} row(s) × {len(frame.columns)} columns written to {show_path(written)}")
