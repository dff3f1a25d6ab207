"""The Recovery cell: rebuild every analysis variable from disk after a disconnect, and record the session.

Self-contained: it needs nothing from earlier cells, and reads metadata only, never weights. Which
run (DESIGN.md, "Which run"): a folder the user gives (the form field, TRAINING_CHECKPOINT_DIR, the
picker's choice) is strict; otherwise the run the Parameters cell planned in this kernel when it has a
checkpoint, else the newest run (by its newest checkpoint's `saved_at`) across every search location.
Recording the session: the workspace's ExperimentDB gets one run `<original>_recovered` linked by
`recovered_from` to the original (recovering the same run again reuses that row), except straight after
the Training cell trained that run in this kernel: nothing was lost, so `model` is kept and nothing is
recorded.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainingConfig
from ._live import in_kernel, print_table
from ._namespace import (
    DRIVE_WORKSPACE,
    RUN_ACTION,
    TRAINED_RUN,
    close_db,
    env_value,
    publish,
    show_path,
    text_output,
)

DISPLAY_KEY = "recovery_display"  # the display the picker replaces, so recoveries do not stack


def labelled_search_dirs(ns: dict[str, Any]) -> dict[str, str]:
    """Where to look when no folder is given, in order, each with what it is (DESIGN.md's search order)."""
    from ..engine.recovery import DEFAULT_SEARCH_DIRS

    dirs: dict[str, str] = {}
    planned = ns.get("planned_config")
    if isinstance(planned, TrainingConfig):
        dirs[str(planned.workspace_root)] = "the Parameters cell's workspace"
    if env := env_value("TRAINING_WORKSPACE"):
        dirs.setdefault(env, "TRAINING_WORKSPACE")
    if ns.get("drive_workspace") or (ns.get("IN_COLAB") and Path(DRIVE_WORKSPACE).is_dir()):
        dirs.setdefault(str(ns.get("drive_workspace") or DRIVE_WORKSPACE), "Google Drive")
    for default in DEFAULT_SEARCH_DIRS:
        dirs.setdefault(default, "a default location")
    return dirs


def search_dirs(ns: dict[str, Any]) -> list[str]:
    return list(labelled_search_dirs(ns))


def _given_directory(checkpoint_directory: str) -> tuple[str | None, str]:
    if env := env_value("TRAINING_CHECKPOINT_DIR"):
        return env, "TRAINING_CHECKPOINT_DIR"
    if str(checkpoint_directory or "").strip():
        return str(checkpoint_directory).strip(), "checkpoint_directory"
    return None, ""


def record_session(db: Any, results: dict[str, Any], config: TrainingConfig) -> tuple[int, bool]:
    """(id of the `<original>_recovered` run, whether it already existed). The link to the
    original is set only when this database holds that run under the same name."""
    original_id = results.get("run_id")
    original = db.get_run(original_id) if isinstance(original_id, int) else None
    linked = original_id if original is not None and original["name"] == results["run_name"] else None
    name = f"{results['run_name']}_recovered"
    for run in reversed(db.list_runs()):
        if run["name"] == name and run["recovered_from"] == linked:
            return run["id"], True
    return db.create_run(name, config.to_dict(), results["workspace_root"], status="recovered",
                         recovered_from=linked), False  # fmt: skip


def _planned_name(ns: dict[str, Any]) -> str | None:
    planned = ns.get("planned_config")
    return planned.run_name if isinstance(planned, TrainingConfig) else None


def _describe(run: Any) -> str:
    if not run.complete:
        return f"'{run.name}' in {show_path(run.run_dir)}: no complete checkpoint"
    return f"'{run.name}' in {show_path(run.run_dir)}: step {run.step}"


def _from_given(ns: dict[str, Any], given: str, source: str) -> dict[str, Any] | None:
    """Strict: the given folder only (a step folder, a run folder, checkpoints/ or a workspace)."""
    from ..engine.foreign_runs import detect
    from ..engine.recovery import recover
    from ..engine.run_search import find_runs, recover_run

    path = Path(given).expanduser()
    if not path.exists():
        print(f"❌ {source}={given} does not exist.")
        print("Next: set it to the folder that holds your run, or clear it to search the usual places.")
        return None
    if detect(path) is not None:  # a Hugging Face output_dir or a Lightning log folder: read as it is
        return {**recover(path, search_dirs=[]), "found_by": f"from {source}"}
    runs = find_runs([path])
    if len(runs) == 1 and path.resolve() != runs[0].run_dir.resolve() and path.parent == runs[0].run_dir:
        return {**recover(path, search_dirs=[]), "found_by": f"from {source}"}  # exactly that step folder
    complete = [r for r in runs if r.complete]
    if not complete:
        print(f"Nothing to recover in {show_path(path)} ({source}): no complete checkpoint there.")
        for run in runs:
            print(f"  {_describe(run)}")
            for item in run.skipped:
                print(f"    {show_path(item['path'])}: {item['reason']}")
        print("Next: choose another run or folder, or run the Training cell to train this one.")
        return None
    chosen = next((r for r in complete if r.name == _planned_name(ns)), complete[0])
    return {**recover_run(chosen, searched=[given]), "found_by": f"from {source}"}


def _from_search(ns: dict[str, Any], labels: dict[str, str]) -> dict[str, Any] | None:
    """The Parameters run when it has a checkpoint, else the newest across every location (said, not silent)."""
    from ..engine.run_search import find_runs, inspect_run, recover_run

    runs = find_runs(list(labels))
    planned = ns.get("planned_config")
    if isinstance(planned, TrainingConfig):
        mine = inspect_run(planned.run_dir, str(planned.workspace_root))
        if mine.complete:
            return {**recover_run(mine, searched=list(labels)), "found_by": "the Parameters cell's run"}
        others = [r for r in runs if r.complete and r.run_dir.resolve() != planned.run_dir.resolve()]
        print(f"⚠️ The Parameters cell's run '{planned.run_name}' has no complete checkpoint in "
              f"{show_path(planned.run_dir)}" + ("; the runs found:" if others else "."))  # fmt: skip
        for run in others:
            print(f"    {_describe(run)}")
        if others:
            print(f"  Recovering the newest, '{others[0].name}'. To train '{planned.run_name}' instead, run the "
                  "Parameters cell, then Training.")  # fmt: skip
    complete = [r for r in runs if r.complete]
    if not complete:
        print("Nothing to recover: no complete checkpoint was found.")
        print(f"  looked in: {', '.join(show_path(d) for d in labels)}")
        for run in runs:
            print(f"  {_describe(run)}")
        print("Next: run the Training cell to start a run, or set checkpoint_directory to the folder that holds")
        print("      your run (a workspace, its checkpoints/ folder, a run folder or a step-NNNNNN folder).")
        return None
    where = labels.get(complete[0].location, "a search location")
    return {**recover_run(complete[0], searched=list(labels)), "found_by": f"the newest run; found in {where}"}


def _report(results: dict[str, Any], origin: str, session: str) -> None:
    history = results.get("metrics_history") or []
    print(f"✅ Recovered run '{results['run_name']}' (run id {results.get('run_id')})")
    print(f"  run folder: {show_path(results['run_dir'])} ({origin})")
    print(f"  checkpoint: {show_path(results['checkpoint_path'])} (step {results.get('step')} of "
          f"{results.get('total_steps')}, {len(history)} epoch(s), "
          f"{'completed' if results.get('completed') else 'not finished'})")  # fmt: skip
    print(f"  best:       {show_path(results['best_checkpoint_path'])} (epoch {results.get('best_epoch')})")
    skipped = list({(s["path"], s["reason"]): s for s in results.get("skipped") or []}.values())
    print(f"  skipped:    {'nothing' if not skipped else len(skipped)}")
    for item in skipped:
        print(f"    {show_path(item['path'])}: {item['reason']}")
    print(f"  experiment db: {session}")
    print_table(history)


def recover_into(ns: dict[str, Any], given: str | None, source: str) -> bool:
    """Recover from `given` (strict) or the search locations, publish the namespace and report. True on success."""
    from ..engine.checkpoint import CheckpointError
    from ..engine.experiment_db import ExperimentDB, ExperimentDBError

    labels = labelled_search_dirs(ns)
    try:
        results = _from_given(ns, given, source) if given is not None else _from_search(ns, labels)
    except (CheckpointError, OSError) as exc:
        print(f"❌ Recovery failed: {exc}")
        print("Next: point checkpoint_directory at another copy of the run, or run the Training cell.")
        return False
    if results is None:
        return False
    try:
        config = TrainingConfig.from_dict(results["config"]).replace(workspace_root=results["workspace_root"])
    except ConfigError as exc:
        print(f"❌ The run at {show_path(results['run_dir'])} has a config this version cannot use: {exc}")
        print("Next: upgrade the package, or recover another run (set checkpoint_directory).")
        return False
    run_dir = str(Path(results["run_dir"]).resolve())
    just_trained = ns.get(RUN_ACTION) == "training" and ns.get(TRAINED_RUN) == run_dir
    model = ns.get("model") if just_trained else None
    close_db(ns)
    db, run_id = None, results.get("run_id")
    try:
        db = ExperimentDB(Path(results["workspace_root"]) / "experiments.db")
        if just_trained:
            results["recovered"] = False
            session = "nothing recorded: this run was just trained in this kernel, nothing was lost"
        else:
            run_id, reused = record_session(db, results, config)
            session = (f"{'reused' if reused else 'recorded this session as'} run {run_id} "
                       f"'{results['run_name']}_recovered'")  # fmt: skip
    except ExperimentDBError as exc:
        session = f"unavailable ({exc}); the analysis cells work without it"
    publish(ns, results, config, db=db, run_id=run_id, model=model)
    ns["scratch_workspace"] = False  # a Training cell after this continues the run, never clears it
    if not just_trained:
        ns[RUN_ACTION] = "recovery"
    _report(results, str(results.pop("found_by", f"from {source}")), session)
    print("Namespace: results, metrics_df, workspace_root, training_config, config, drift_data, db, run_id"
          + (", model (kept: trained in this kernel)." if model is not None else "."))  # fmt: skip
    if model is None:
        print("  (weights are not loaded: the Inference cell loads them from the best checkpoint).")
    more = "" if results.get("completed") else "; or re-run the Training cell to finish this run"
    print(f"Next: Dashboard, Diagnostic, Best model, CSV export, Inference{more}.")
    return True


def _show(ns: dict[str, Any], text: str, *, replace: bool) -> None:
    """Print `text`; in a kernel as one display the picker can replace (so recoveries do not stack)."""
    handle = ns.get(DISPLAY_KEY)
    if not in_kernel():
        print(text, end="")
        return
    from IPython.display import display

    if replace and handle is not None:
        handle.update({"text/plain": text}, raw=True)
    else:
        ns[DISPLAY_KEY] = display({"text/plain": text}, raw=True, display_id=True)


def _captured(ns: dict[str, Any], given: str | None, source: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        recover_into(ns, given, source)
    return buffer.getvalue()


@text_output
def run(ns: dict[str, Any], checkpoint_directory: str = "", run_name: str | None = None) -> None:
    """Recover the run the form, TRAINING_CHECKPOINT_DIR, the Parameters cell or the search locations name."""
    given, source = _given_directory(checkpoint_directory)
    if given is not None and run_name:
        given = str(Path(given).expanduser() / "checkpoints" / run_name)
    _show(ns, _captured(ns, given, source), replace=False)


def runs_on_disk(ns: dict[str, Any], checkpoint_directory: str = "") -> list[Any]:
    """Every run the Recovery cell would consider, in its order (the given folder only, when one is given)."""
    from ..engine.run_search import find_runs

    given, _ = _given_directory(checkpoint_directory)
    return find_runs([given] if given else search_dirs(ns))


def _close_picker(ns: dict[str, Any]) -> None:
    old = ns.get("run_picker")
    for widget in [*getattr(old, "children", ()), old]:
        if hasattr(widget, "close"):
            widget.close()


@text_output
def picker(ns: dict[str, Any], checkpoint_directory: str = "", show: bool = True) -> None:
    """An optional ipywidgets layer over `run`: the runs on disk in the order Recovery uses, and a button
    that recovers exactly the chosen run, replacing the recovery output above. Only with two or more
    runs; with `show` False (the form's default: a saved notebook keeps no widget state) the runs are
    listed as text instead. It never waits for a click. The widget is left in `ns["run_picker"]` (None
    when none is shown)."""
    _close_picker(ns)
    ns["run_picker"] = None
    runs = runs_on_disk(ns, checkpoint_directory)
    if len(runs) < 2:
        return
    if not show:
        print(f"{len(runs)} runs on disk, newest first (the order Recovery uses):")
        for run in runs:
            print(f"  {_describe(run)}")
        print(
            "To recover another: tick show_run_picker and re-run this cell, or set checkpoint_directory to its folder."
        )
        return
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return
    labels = [(f"{r.name}  ({show_path(r.run_dir)}{'' if r.complete else ', no complete checkpoint'})",
               str(r.run_dir)) for r in runs]  # fmt: skip
    choice = widgets.Dropdown(options=labels, description="Run:", layout=widgets.Layout(width="70%"))
    button = widgets.Button(description="Recover this run", button_style="primary")

    def recover_chosen(_: Any) -> None:
        _show(ns, _captured(ns, choice.value, "the run picker"), replace=True)

    button.on_click(recover_chosen)
    box = widgets.VBox([widgets.HTML(f"{len(runs)} runs on disk, newest first (the order Recovery uses):"),
                        widgets.HBox([choice, button])])  # fmt: skip
    ns["run_picker"] = box
    _retire_when_another_cell_runs(ns, display(box, display_id=True), len(runs))


def _retire_when_another_cell_runs(ns: dict[str, Any], handle: Any, count: int) -> None:
    """A notebook keeps no widget state: once another cell runs, the picker becomes a line of text, so a
    saved notebook shows no widget it cannot draw. Re-running this cell shows the picker again."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None or handle is None:
        return
    calls = []

    def retire(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 1:  # this cell's own end
            return
        shell.events.unregister("post_run_cell", retire)
        if ns.get("run_picker") is not None:
            _close_picker(ns)
            ns["run_picker"] = None
        text = f"({count} runs on disk; the run picker closed when another cell ran: re-run this cell to choose a run)"
        handle.update({"text/plain": text}, raw=True)

    shell.events.register("post_run_cell", retire)
