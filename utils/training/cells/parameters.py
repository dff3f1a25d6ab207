"""The Parameters cell: the Colab form values, the TRAINING_* overrides, and the workspace they resolve to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PRESETS, ConfigError, TrainingConfig
from ._namespace import COLAB_WORKSPACE, LOCAL_WORKSPACE, SCRATCH_WORKSPACE, env_value, show_path, text_output

DEFAULTS = {"run_name": "notebook_run", "preset": "tiny", "epochs": 2, "workspace": ""}


@dataclass
class Plan:
    """What the Training cell will do: the config, and whether its workspace is the local scratch one."""

    config: TrainingConfig
    scratch: bool
    notes: list[str]


def _workspace(form_value: str, ns: dict[str, Any]) -> tuple[str, bool, str]:
    """(workspace, whether the Training cell clears it first, where the choice came from)."""
    if env := env_value("TRAINING_WORKSPACE"):
        root, origin = env, "from TRAINING_WORKSPACE"
    elif str(form_value or "").strip():
        root, origin = str(form_value).strip(), "from the form"
    elif ns.get("drive_workspace"):
        root, origin = str(ns["drive_workspace"]), "on Google Drive: survives a recycled VM"
    elif ns.get("IN_COLAB"):
        root, origin = COLAB_WORKSPACE, "Colab's local disk: wiped when the VM is recycled; mount Drive in Setup"
    else:
        root, origin = LOCAL_WORKSPACE, "the default local workspace: a run here resumes where it stopped"
    # A fresh start (CI, a reproducible notebook run) is asked for explicitly, and only ever
    # clears the scratch folder in the working directory, never a workspace a person chose.
    fresh = (
        env_value("TRAINING_FRESH_START") == "1" and Path(root).resolve() == (Path.cwd() / SCRATCH_WORKSPACE).resolve()
    )
    if fresh:
        origin += "; TRAINING_FRESH_START=1: the Training cell clears it and starts afresh"
    return root, fresh, origin


def plan(ns: dict[str, Any], run_name: str, preset: str, epochs: int | str, workspace: str) -> Plan:
    """The config the form and the overrides describe. Raises ConfigError naming a bad value."""
    notes = []
    values: dict[str, Any] = {"run_name": run_name, "preset": preset, "epochs": epochs}
    for key, env in (("run_name", "TRAINING_RUN_NAME"), ("preset", "TRAINING_PRESET"), ("epochs", "TRAINING_EPOCHS")):
        if (override := env_value(env)) is not None:
            values[key] = override
            notes.append(f"{key}={override} (from {env})")
    try:
        epochs_value = int(str(values["epochs"]).strip())
    except ValueError:
        raise ConfigError(f"epochs={values['epochs']!r} is not a whole number; set e.g. 2") from None
    if values["preset"] not in PRESETS:
        raise ConfigError(f"preset={values['preset']!r} is not one of {sorted(PRESETS)}")
    root, scratch, origin = _workspace(workspace, ns)
    notes.append(f"workspace {show_path(root)} ({origin})")
    config = TrainingConfig.from_preset(
        values["preset"], run_name=str(values["run_name"]).strip(), epochs=epochs_value, workspace_root=root
    )
    return Plan(config=config, scratch=scratch, notes=notes)


@text_output
def run(
    ns: dict[str, Any],
    run_name: str = DEFAULTS["run_name"],
    preset: str = DEFAULTS["preset"],
    epochs: int | str = DEFAULTS["epochs"],
    workspace: str = DEFAULTS["workspace"],
) -> None:
    try:
        p = plan(ns, run_name, preset, epochs, workspace)
    except ConfigError as exc:
        ns.pop("planned_config", None)
        print(f"❌ {exc}.")
        print("   Next: fix the form value (or the TRAINING_* variable) and re-run this cell.")
        return
    ns["planned_config"] = p.config
    ns["scratch_workspace"] = p.scratch
    cfg = p.config
    print(f"Run '{cfg.run_name}': preset {cfg.preset} ({cfg.n_layer} layers × {cfg.n_embd} dims), "
          f"{cfg.epochs} epoch(s) × {cfg.steps_per_epoch} steps")  # fmt: skip
    for note in p.notes:
        print(f"  {note}")
    print(f"  checkpoints go to {show_path(cfg.run_dir)}")
    print("Next: the Training cell (it resumes this run when it already has a checkpoint).")
