"""The Diagnostic cell: which namespace variables are set, a summary of the session, and the cell to run next."""

from __future__ import annotations

from typing import Any

from ._namespace import OPTIONAL_NAMES, REQUIRED_NAMES, problem, show_path, text_output


def next_cell(ns: dict[str, Any]) -> str:
    """The one cell to run next, given what is in the namespace."""
    if any(problem(ns, name) for name in REQUIRED_NAMES):
        if problem(ns, "results") is None:
            return "the Recovery cell (or the Training cell): it sets every variable again"
        return (
            "the Recovery cell after a disconnect (it reads checkpoint metadata, never changes a checkpoint, and records "
            "the session in the experiment database), or the Training cell to train"
        )
    results = ns["results"]
    if not results.get("metrics_history"):
        return "the Training cell: the run has no completed epoch yet"
    if not results.get("completed", True):
        return "the Training cell to finish the run, or the Dashboard cell to look at it so far"
    return "the Dashboard cell, then Best model, CSV export and Inference"


@text_output
def run(ns: dict[str, Any]) -> None:
    print("Required variables:")
    for name in REQUIRED_NAMES:
        why = problem(ns, name)
        print(f"  {'✅' if why is None else '❌'} {name}" + ("" if why is None else f" ({why})"))
    print("Optional variables:")
    for name in OPTIONAL_NAMES:
        present = ns.get(name) is not None
        print(f"  {'✅' if present else '⚪'} {name}" + ("" if present else " (not set)"))
    if problem(ns, "results") is None:
        results = ns["results"]
        config = ns.get("training_config") if problem(ns, "training_config") is None else None
        print("Session:")
        print(f"  run name:   {config.run_name if config is not None else results.get('run_name')}")
        print(f"  epochs:     {len(results.get('metrics_history') or [])} completed"
              + (f" of {config.epochs}" if config is not None else ""))  # fmt: skip
        print(f"  workspace:  {show_path(ns.get('workspace_root') or results.get('workspace_root'))}")
        print(f"  checkpoint: {show_path(results.get('checkpoint_path'))}")
        if results.get("recovered"):
            print("  source:     recovered from disk (this session recorded as <run>_recovered in the database)")
        else:
            print("  source:     trained in this session (a Recovery straight after Training records nothing)")
    else:
        print("Session: no run loaded.")
    print(f"Next: {next_cell(ns)}.")
