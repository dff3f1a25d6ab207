"""The Dashboard cell: the run's training curves (and drift, when recorded) as one figure, shown and saved."""

from __future__ import annotations

from typing import Any

from ._namespace import check, show_path, text_output


@text_output
def run(ns: dict[str, Any], show: bool = True) -> None:
    from ..analysis import NothingToAnalyse, panel_count, save_dashboard

    if not check(ns, ["results"], cell="Dashboard"):
        return
    results = ns["results"]
    try:
        path = save_dashboard(results)
    except NothingToAnalyse as exc:
        print(f"⚪ Nothing to plot yet: {exc}.")
        print("Next: let the Training cell finish an epoch, or recover a run that has one.")
        return
    except OSError as exc:
        print(f"❌ Could not write the dashboard: {exc}")
        print("Next: check the workspace is writable (or free some space) and re-run this cell.")
        return
    panels = panel_count(results)
    kind = "6 training + 4 drift" if panels == 10 else "training only: this run recorded no drift"
    ns["dashboard_path"] = str(path)
    print(f"Dashboard of run '{results['run_name']}': {panels} panels ({kind})")
    print(f"  saved to {show_path(path)}")
    if show:
        from IPython.display import Image, display

        display(Image(filename=str(path)))
