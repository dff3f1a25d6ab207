"""The Parameters cell: the Colab form values, the TRAINING_* overrides, and the workspace they resolve to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PRESETS, ConfigError, TrainingConfig
from ._namespace import (
    COLAB_WORKSPACE,
    LOCAL_WORKSPACE,
    RUN_ACTION,
    SCRATCH_WORKSPACE,
    env_value,
    show_path,
    text_output,
)

DEFAULTS = {"run_name": "notebook_run", "preset": "tiny", "epochs": 2, "workspace": ""}
CONTINUE, NEW_RUN = "continue", "start a new run"  # the form's resume choices; anything else is a checkpoint


@dataclass
class Plan:
    """What the Training cell will do: the config, whether its workspace is the local scratch one, and
    `resume` as the trainer takes it ("auto", or the path of the checkpoint to restart from)."""

    config: TrainingConfig
    scratch: bool
    notes: list[str]
    resume: str = "auto"


def fresh_run_name(workspace: str, run_name: str) -> str:
    """`run_name`, or the first of `run_name-2`, `run_name-3`, ... with no folder yet: a new run never
    touches an old one."""
    base = Path(workspace) / "checkpoints"
    if not (base / run_name).exists():
        return run_name
    n = 2
    while (base / f"{run_name}-{n}").exists():
        n += 1
    return f"{run_name}-{n}"


def _whole(name: str, value: Any, minimum: int = 0) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number; set e.g. {max(minimum, 2)}") from None
    if number < minimum:
        raise ConfigError(f"{name}={number} must be at least {minimum}")
    return number


def _schedule_note(config: TrainingConfig) -> str | None:
    """When the run already exists with another number of epochs: how its schedule changes."""
    from ..engine.run_search import inspect_run
    from ..engine.trainer_state import read_trainer_state

    found = inspect_run(config.run_dir)
    if found.checkpoint is None:
        return None
    saved = (read_trainer_state(found.checkpoint).get("config") or {}).get("epochs")
    if not isinstance(saved, int) or saved == config.epochs:
        return None
    return (f"epochs {saved} → {config.epochs}: the run continues from step {found.step}, and its learning-rate "
            f"schedule (cosine) is stretched over the new total of {config.total_steps} steps")  # fmt: skip


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


OVERRIDES = (("run_name", "TRAINING_RUN_NAME"), ("preset", "TRAINING_PRESET"), ("epochs", "TRAINING_EPOCHS"))


def plan(ns: dict[str, Any], run_name: str, preset: str, epochs: int | str, workspace: str, *,
         save_every_minutes: float | str = 5, keep_last: int | str = 3, seed: int | str = 1337,
         data_path: str = "", resume: str = CONTINUE, tensorboard: bool = False) -> Plan:  # fmt: skip
    """The config the form and the overrides describe. Raises ConfigError naming a bad value."""
    notes = []
    values: dict[str, Any] = {"run_name": run_name, "preset": preset, "epochs": epochs}
    for key, env in OVERRIDES:
        if (override := env_value(env)) is not None:
            values[key] = override
            notes.append(f"{key}={override} (from {env})")
    epochs_value = _whole("epochs", values["epochs"], 1)
    if values["preset"] not in PRESETS:
        raise ConfigError(f"preset={values['preset']!r} is not one of {sorted(PRESETS)}")
    try:
        save_seconds = 60.0 * float(str(save_every_minutes).strip())
    except ValueError:
        raise ConfigError(
            f"save_every_minutes={save_every_minutes!r} is not a number; set e.g. 5 (0: epoch ends only)"
        ) from None
    root, scratch, origin = _workspace(workspace, ns)
    notes.append(f"workspace {show_path(root)} ({origin})")
    name = str(values["run_name"]).strip()
    choice = str(resume or CONTINUE).strip()
    if choice == NEW_RUN and name:
        fresh = fresh_run_name(root, name)
        if fresh != name:
            notes.append(
                f"start a new run: '{name}' already exists, so this run is '{fresh}' ('{name}' is not touched)"
            )
        name = fresh
    elif choice not in (CONTINUE, NEW_RUN):
        if not Path(choice).expanduser().is_dir():
            raise ConfigError(f"resume={choice!r} is neither {CONTINUE!r}, {NEW_RUN!r} nor a checkpoint folder")
        notes.append(f"resume from exactly the checkpoint {show_path(choice)}")
    config = TrainingConfig.from_preset(
        values["preset"], run_name=name, epochs=epochs_value, workspace_root=root, save_every_seconds=save_seconds,
        keep_last=_whole("keep_last", keep_last), seed=_whole("seed", seed), corpus=str(data_path).strip() or None,
        tensorboard=bool(tensorboard),
    )  # fmt: skip
    config.validate()
    trainer_resume = "auto" if choice in (CONTINUE, NEW_RUN) else str(Path(choice).expanduser())
    return Plan(config=config, scratch=scratch, notes=notes, resume=trainer_resume)


@text_output
def run(
    ns: dict[str, Any],
    run_name: str = DEFAULTS["run_name"],
    preset: str = DEFAULTS["preset"],
    epochs: int | str = DEFAULTS["epochs"],
    workspace: str = DEFAULTS["workspace"],
    **form: Any,
) -> None:
    """`form`: save_every_minutes, keep_last, seed, data_path, resume, tensorboard (see `plan`)."""
    try:
        p = plan(ns, run_name, preset, epochs, workspace, **form)
    except ConfigError as exc:
        ns.pop("planned_config", None)
        ns[RUN_ACTION] = "parameters"  # the Training cell must not fall back to another run or the defaults
        print(f"❌ {exc}.")
        print("   Next: fix the form value (or the TRAINING_* variable) and re-run this cell.")
        return
    ns["planned_config"], ns["planned_resume"], ns["scratch_workspace"] = p.config, p.resume, p.scratch
    ns[RUN_ACTION] = "parameters"
    cfg = p.config
    saves = f"every {cfg.save_every_seconds / 60:g} min and " if cfg.save_every_seconds else ""
    print(f"Run '{cfg.run_name}': preset {cfg.preset} ({cfg.n_layer} layers × {cfg.n_embd} dims), "
          f"{cfg.epochs} epoch(s) × {cfg.steps_per_epoch} steps, seed {cfg.seed}")  # fmt: skip
    for note in p.notes:
        print(f"  {note}")
    print(f"  data: {show_path(cfg.corpus) if cfg.corpus else 'the Python standard library (no download)'}")
    print(f"  checkpoints go to {show_path(cfg.run_dir)}: saved {saves}at each epoch end, the last "
          f"{cfg.keep_last or 'all'} kept (and the best)")  # fmt: skip
    if cfg.tensorboard:
        print(f"  TensorBoard: events in {show_path(Path(cfg.workspace_root) / 'tensorboard')} "
              "(in Colab: %load_ext tensorboard, then %tensorboard --logdir with that folder)")  # fmt: skip
    if not p.scratch and p.resume == "auto" and (note := _schedule_note(cfg)):
        print(f"  ⚠️ {note}")
    print("Next: the Model cell, then Training (it continues this run when it already has a checkpoint).")
