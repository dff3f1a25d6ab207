"""The Recovery cell: rebuild every analysis variable from disk after a disconnect, and record the session.

Self-contained: it needs nothing from earlier cells. It searches the folder it is given
(the form field, or TRAINING_CHECKPOINT_DIR), then the Parameters cell's workspace if that
ran, Google Drive in Colab, and the default places; it reads metadata only, never weights.
Recording the session: the workspace's ExperimentDB gets one run `<original>_recovered`
linked by `recovered_from` to the original; recovering the same run again reuses that row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainingConfig
from ._namespace import DRIVE_WORKSPACE, close_db, env_value, publish, show_path, text_output
from .training import print_epochs


def labelled_search_dirs(ns: dict[str, Any]) -> dict[str, str]:
    """Where to look after the given folder, in order, each with what it is: the Parameters
    cell's workspace, Google Drive, then the default places."""
    from ..engine.recovery import DEFAULT_SEARCH_DIRS

    dirs: dict[str, str] = {}
    planned = ns.get("planned_config")
    if isinstance(planned, TrainingConfig):
        dirs[str(planned.workspace_root)] = "the Parameters cell's workspace"
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


@text_output
def run(ns: dict[str, Any], checkpoint_directory: str = "", run_name: str | None = None) -> None:
    """Recover the newest run (or `run_name`) from the given folder or the search locations."""
    given, source = _given_directory(checkpoint_directory)
    recover_into(ns, given, source, run_name)


def recover_into(ns: dict[str, Any], given: str | None, source: str, run_name: str | None = None) -> None:
    from ..engine.checkpoint import CheckpointError, NoCheckpointFound
    from ..engine.experiment_db import ExperimentDB, ExperimentDBError
    from ..engine.recovery import recover

    labels = labelled_search_dirs(ns)
    if given is not None and not Path(given).expanduser().exists():
        print(f"⚠️ {source}={given} does not exist; looking in the default places instead.")
        given = None
    try:
        results = recover(given, search_dirs=list(labels), run_name=run_name or None)
    except NoCheckpointFound as exc:
        print("Nothing to recover: no complete checkpoint was found.")
        print(f"  looked in: {exc.path}")
        if "passed over" in exc.reason:
            print(f"  {exc.reason.split('; ', 1)[-1]}")
        print("Next: run the Training cell to start a run, or set checkpoint_directory to the folder that holds")
        print("      your run (a workspace, its checkpoints/ folder, a run folder or a step-NNNNNN folder).")
        return
    except (CheckpointError, OSError) as exc:
        print(f"❌ Recovery failed: {exc}")
        print("Next: point checkpoint_directory at another copy of the run, or run the Training cell.")
        return
    try:
        config = TrainingConfig.from_dict(results["config"]).replace(workspace_root=results["workspace_root"])
    except ConfigError as exc:
        print(f"❌ The run at {show_path(results['run_dir'])} has a config this version cannot use: {exc}")
        print("Next: upgrade the package, or recover another run (set checkpoint_directory).")
        return

    close_db(ns)
    db, run_id, db_note = None, results.get("run_id"), ""
    try:
        db = ExperimentDB(Path(results["workspace_root"]) / "experiments.db")
        run_id, reused = record_session(db, results, config)
        db_note = (f"{'reused' if reused else 'recorded this session as'} run {run_id} "
                   f"'{results['run_name']}_recovered'")  # fmt: skip
    except ExperimentDBError as exc:
        db_note = f"unavailable ({exc}); the analysis cells work without it"
    publish(ns, results, config, db=db, run_id=run_id, model=None)
    ns["scratch_workspace"] = False  # a Training cell after this continues the run, never clears it

    searched = results.get("searched") or []
    where = searched[-1] if searched else results["checkpoint_dir"]
    by_path = {str(Path(d).expanduser()): label for d, label in labels.items()}
    origin = f"from {source}" if given is not None and searched[:1] == [where] else by_path.get(where, "searched")
    history = results.get("metrics_history") or []
    print(f"✅ Recovered run '{results['run_name']}' (run id {results.get('run_id')})")
    print(f"  run folder: {show_path(results['run_dir'])}")
    print(f"  found in:   {show_path(where)} ({origin}; looked in {len(searched)} place(s))")
    print(f"  checkpoint: {show_path(results['checkpoint_path'])} (step {results.get('step')} of "
          f"{results.get('total_steps')}, {len(history)} epoch(s), "
          f"{'completed' if results.get('completed') else 'not finished'})")  # fmt: skip
    print(f"  best:       {show_path(results['best_checkpoint_path'])} (epoch {results.get('best_epoch')})")
    skipped = results.get("skipped") or []
    print(f"  skipped:    {'nothing' if not skipped else len(skipped)}")
    for item in skipped:
        print(f"    {show_path(item['path'])}: {item['reason']}")
    print(f"  experiment db: {db_note}")
    print_epochs(results)
    print("Namespace: results, metrics_df, workspace_root, training_config, config, drift_data, db, run_id")
    print("  (weights are not loaded: the Inference cell loads them from the best checkpoint).")
    more = "" if results.get("completed") else "; or re-run the Training cell to finish the run"
    print(f"Next: Dashboard, Diagnostic, Best model, CSV export, Inference{more}.")


def runs_on_disk(ns: dict[str, Any], checkpoint_directory: str = "") -> list[Path]:
    """Every run folder in the places the Recovery cell searches, newest first."""
    from ..engine.checkpoint import list_checkpoints
    from ..engine.recovery import resolve_runs

    given, _ = _given_directory(checkpoint_directory)
    found: dict[Path, Path] = {}
    for base in ([given] if given else []) + search_dirs(ns):
        path = Path(base).expanduser()
        if path.is_dir():
            for run_dir in resolve_runs(path)[0]:
                found.setdefault(run_dir.resolve(), run_dir)

    def newest_step(run_dir: Path) -> float:
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[0][1].stat().st_mtime if checkpoints else 0.0

    return sorted(found.values(), key=newest_step, reverse=True)


@text_output
def picker(ns: dict[str, Any], checkpoint_directory: str = "") -> None:
    """An optional ipywidgets layer over `run`: a list of the runs on disk and a button that
    recovers the chosen one. Shown only with two or more runs and ipywidgets installed;
    it never waits for a click. The widget is left in `ns["run_picker"]` (None when none is shown)."""
    ns["run_picker"] = None
    runs = runs_on_disk(ns, checkpoint_directory)
    if len(runs) < 2:
        return
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return
    choice = widgets.Dropdown(options=[(f"{r.name}  ({show_path(r)})", str(r)) for r in runs],
                              description="Run:", layout=widgets.Layout(width="70%"))  # fmt: skip
    button = widgets.Button(description="Recover this run", button_style="primary")
    output = widgets.Output()

    def recover_chosen(_: Any) -> None:
        with output:
            output.clear_output()
            recover_into(ns, choice.value, "the run picker")

    button.on_click(recover_chosen)
    box = widgets.VBox([widgets.HTML(f"{len(runs)} runs on disk; the newest was recovered above."),
                        widgets.HBox([choice, button]), output])  # fmt: skip
    display(box)
    ns["run_picker"] = box
