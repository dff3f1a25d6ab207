"""Is a resume an exact continuation? Compare every setting that shapes the next steps.

A resume continues bit-identically only with the same model shape, batch size, steps per
epoch, optimizer and schedule settings, data and seed. `check_continuation` compares the
checkpoint's saved config and data fingerprint with the new ones: a mismatch raises
ConfigChanged naming the field, the saved value, the new value and how to accept it
(`accept_config_change`); accepted changes are returned so the caller records them in
run.json's `changes` list (`record_changes`). More `epochs` needs no flag: the cosine is
re-stretched over the new total, and the returned notice says how. Torch-free.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commit import CheckpointCorrupt, fsync_dir, read_json, write_json_file

# A different value here is a different model: no flag makes it a continuation.
MODEL_SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "context_length")
# A different value here changes the steps that follow: refused unless accepted.
EXACTNESS_FIELDS = (
    "batch_size", "steps_per_epoch", "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay",
    "beta1", "beta2", "grad_clip", "dropout", "seed", "val_fraction", "eval_batches", "corpus",
    "corpus_max_bytes", "precision", "task_options",
)  # fmt: skip
# log_every_steps, epochs (see schedule_notice), the save cadence, retention, device, on_save_error
# and the logging settings may change freely: they do not change the steps that follow.
DATA_FINGERPRINT = "data_fingerprint"
RUN_FILE = "run.json"


class ConfigChanged(ValueError):
    """The new settings would not continue the run exactly. Carries the field, both values
    and the setting that accepts the change (`accept_config_change`)."""

    def __init__(self, field_name: str, saved: Any, new: Any, *, acceptable: bool, checkpoint: str) -> None:
        self.field = field_name
        self.saved = saved
        self.new = new
        self.acceptable = acceptable
        self.checkpoint = checkpoint
        fix = (
            "use the saved value, or accept the change on purpose with accept_config_change (it is recorded in run.json)"
            if acceptable
            else "use the same model shape, or a new run name"
        )
        super().__init__(f"{checkpoint} was trained with {field_name}={saved!r}, the new value is {new!r}; {fix}")


@dataclass
class Continuation:
    """What a compatible resume changes: accepted changes (to record) and notices (to say)."""

    changes: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=0, abs_tol=0) or float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def schedule_notice(
    saved: dict[str, Any], new: dict[str, Any], step: int, steps_per_epoch: int | None = None
) -> str | None:
    """Extending (or shortening) `epochs`: how the warmup + cosine schedule changes.
    `steps_per_epoch`: the run's actual count (the config's may be 0, one full pass)."""
    old_epochs, new_epochs = saved.get("epochs"), new.get("epochs")
    if old_epochs == new_epochs or not isinstance(old_epochs, int):
        return None
    per_epoch = steps_per_epoch if isinstance(steps_per_epoch, int) and steps_per_epoch > 0 else new["steps_per_epoch"]
    old_total, new_total = old_epochs * per_epoch, new_epochs * per_epoch
    return (
        f"epochs {old_epochs} -> {new_epochs}: the cosine learning-rate schedule is re-stretched from "
        f"{old_total} to {new_total} steps, continuing at step {step} (the rate rises from where the old "
        "schedule had it and decays to the minimum at the new end)"
    )


def check_continuation(
    saved_config: dict[str, Any],
    new_config: dict[str, Any],
    *,
    step: int,
    checkpoint: str,
    saved_fingerprint: str | None = None,
    new_fingerprint: str | None = None,
    accept: bool = False,
    model_shape: bool = True,
    steps_per_epoch: int | None = None,
) -> Continuation:
    """Compare the settings a checkpoint was trained with against the new ones. Raises
    ConfigChanged on the first mismatch that is not accepted; returns the accepted changes
    and the notices (schedule re-stretch) for a compatible one. `model_shape`: compare the
    byte LM's size fields (a task's own model is checked by loading its state dict)."""
    result = Continuation()
    for name in MODEL_SHAPE_FIELDS if model_shape else ():
        if name in saved_config and not _same(saved_config[name], new_config.get(name)):
            raise ConfigChanged(name, saved_config[name], new_config.get(name), acceptable=False, checkpoint=checkpoint)
    compared = [(name, saved_config[name], new_config.get(name)) for name in EXACTNESS_FIELDS if name in saved_config]
    if saved_fingerprint is not None and new_fingerprint is not None:
        compared.append((DATA_FINGERPRINT, saved_fingerprint, new_fingerprint))
    for name, old, new in compared:
        if _same(old, new):
            continue
        if not accept:
            raise ConfigChanged(name, old, new, acceptable=True, checkpoint=checkpoint)
        result.changes.append({"what": name, "old": old, "new": new, "step": step, "time": time.time()})
        result.notices.append(f"accepted a changed {name}: {old!r} -> {new!r} at step {step} (recorded in run.json)")
    notice = schedule_notice(saved_config, new_config, step, steps_per_epoch)
    if notice:
        result.notices.append(notice)
    return result


def cuda_rng_notice(saved_states: int, devices_now: int) -> str | None:
    """The CUDA RNG is restored per device; a different device count cannot be exact."""
    if saved_states == devices_now or saved_states == 0:
        return None
    return (
        f"the checkpoint holds the CUDA random state of {saved_states} device(s), this machine has "
        f"{devices_now}: the CUDA random state is not restored, so random draws on the GPU (dropout) will "
        "differ from an uninterrupted run"
    )


def record_changes(run_dir: Path, changes: list[dict[str, Any]]) -> None:
    """Append accepted changes to run.json's `changes` list (atomically: temp file, fsync,
    rename). A run.json that cannot be read is refused rather than overwritten."""
    if not changes:
        return
    path = Path(run_dir) / RUN_FILE
    info = read_json(path, RUN_FILE)
    if not isinstance(info, dict):
        raise CheckpointCorrupt(path, "run.json is not a JSON object; the changes were not recorded")
    existing = info.get("changes")
    info["changes"] = (existing if isinstance(existing, list) else []) + changes
    tmp = path.with_name(f".{RUN_FILE}.tmp-{os.getpid()}")
    write_json_file(tmp, info)
    os.replace(tmp, path)
    fsync_dir(path.parent)
