"""TrainingConfig: every setting of a run, validated, with presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1

PRESETS: dict[str, dict[str, Any]] = {
    # Two CPU cores finish a 2-epoch run in a few seconds: tests and CI use it.
    "tiny": dict(
        n_layer=2, n_head=2, n_embd=64, context_length=64, batch_size=8,
        steps_per_epoch=20, eval_batches=4, warmup_steps=5, learning_rate=3e-3,
    ),
    # A few minutes on a laptop CPU; learns visible Python structure.
    "small": dict(
        n_layer=4, n_head=4, n_embd=128, context_length=128, batch_size=16,
        steps_per_epoch=200, eval_batches=10, warmup_steps=50, learning_rate=1e-3,
    ),
    # A Colab GPU: ~10M parameters.
    "base": dict(
        n_layer=6, n_head=6, n_embd=384, context_length=256, batch_size=32,
        steps_per_epoch=500, eval_batches=20, warmup_steps=100, learning_rate=6e-4,
    ),
}  # fmt: skip


class ConfigError(ValueError):
    """A config value is out of range; the message names the field and what is allowed."""


@dataclass(kw_only=True)
class TrainingConfig:
    """Settings of one training run. Field docstrings are the comments beside each field."""

    # Identity and place on disk.
    run_name: str = "default"  # folder name under <workspace>/checkpoints
    workspace_root: str = "./training_output"  # checkpoints/, results/, experiments.db
    preset: str = "tiny"  # the preset the model/batch sizes came from
    seed: int = 1337
    corpus: str | None = None  # text file or folder of text files; None = Python's stdlib
    corpus_max_bytes: int = 4_000_000  # cap on the corpus read into memory
    val_fraction: float = 0.1  # the tail of the corpus held out for validation

    # Model.
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    context_length: int = 64

    # Optimisation.
    batch_size: int = 8  # sequences per step (per process when distributed)
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    epochs: int = 2
    steps_per_epoch: int = 20  # 0 = one full pass over the training data
    eval_batches: int = 4  # 0 = a full validation pass
    log_every_steps: int = 10  # a steps.jsonl line every N steps; 0 = none
    task_options: dict[str, Any] = field(default_factory=dict)  # a task's own settings, passed to its builder

    # Checkpoints.
    save_every_steps: int = 0  # 0 = only at epoch ends (and by time)
    save_every_seconds: float = 300.0  # a disconnect gives no notice; 0 disables
    keep_last: int = 3  # 0 keeps every checkpoint
    keep_best: int = 1
    monitor_metric: str = "val/loss"
    monitor_mode: str = "min"
    async_save: bool = True  # copy state to CPU buffers, write in a background thread
    # Free those buffers (a full host copy of the state) after each save instead of reusing them:
    # less resident memory between saves, at the cost of allocating them again at the next save.
    release_snapshot_buffers: bool = False
    on_save_error: str = "stop"  # "stop" raises; "continue" logs and trains on

    # Logging.
    tensorboard: bool = False  # step and epoch metrics as event files in <workspace>/tensorboard/<run>

    # Hardware.
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16/fp16 AMP on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    distributed_strategy: str = "ddp"  # ddp | fsdp, used under torchrun

    config_version: int = CONFIG_VERSION
    # Keys a newer version wrote that this one does not know; reported, kept for the record.
    unknown_keys: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.workspace_root = str(self.workspace_root)
        if self.corpus is not None:
            self.corpus = str(self.corpus)
        self.validate()

    # -- derived paths -----------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        """`<workspace>/checkpoints`: every run's folder lives here."""
        return Path(self.workspace_root) / "checkpoints"

    @property
    def run_dir(self) -> Path:
        """`<workspace>/checkpoints/<run_name>`: this run's checkpoints and logs."""
        return self.checkpoint_dir / self.run_name

    @property
    def results_dir(self) -> Path:
        return Path(self.workspace_root) / "results"

    @property
    def db_path(self) -> Path:
        return Path(self.workspace_root) / "experiments.db"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    # -- validation --------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ConfigError(f"config field {name}={value!r} is invalid: allowed {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        name_ok = (
            isinstance(self.run_name, str)
            and 0 < len(self.run_name) <= 128
            and all(c.isalnum() or c in "-_." for c in self.run_name)
            and not self.run_name.startswith(".")
        )
        need(name_ok, "run_name", "1-128 characters of letters, digits, '-', '_' or '.'")
        need(isinstance(self.workspace_root, str) and self.workspace_root != "", "workspace_root", "a folder path")
        need(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}")
        need(is_int(self.seed) and 0 <= self.seed < 2**63, "seed", "an integer in [0, 2**63)")
        need(is_int(self.corpus_max_bytes) and self.corpus_max_bytes >= 1024, "corpus_max_bytes", "an integer >= 1024")
        need(is_num(self.val_fraction) and 0.0 < self.val_fraction < 0.5, "val_fraction", "a number in (0, 0.5)")
        for name in ("n_layer", "n_head", "n_embd", "context_length", "batch_size"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head={self.n_head}")
        need(is_num(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)")
        need(is_num(self.learning_rate) and 0 < self.learning_rate <= 1, "learning_rate", "a number in (0, 1]")
        need(is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_num(self.beta1) and 0 <= self.beta1 < 1, "beta1", "a number in [0, 1)")
        need(is_num(self.beta2) and 0 <= self.beta2 < 1, "beta2", "a number in [0, 1)")
        need(is_num(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 disables)")
        need(is_int(self.epochs) and 1 <= self.epochs <= 100_000, "epochs", "an integer in [1, 100000]")
        need(
            is_int(self.steps_per_epoch) and self.steps_per_epoch >= 0,
            "steps_per_epoch",
            "an integer >= 0 (0 = one full pass over the data)",
        )
        need(is_int(self.eval_batches) and self.eval_batches >= 0, "eval_batches", "an integer >= 0 (0 = all)")
        need(is_int(self.log_every_steps) and self.log_every_steps >= 0, "log_every_steps", "an integer >= 0 (0 = off)")
        need(isinstance(self.task_options, dict), "task_options", "a JSON object (dict) of the task's own settings")
        need(
            is_int(self.save_every_steps) and self.save_every_steps >= 0,
            "save_every_steps",
            "an integer >= 0 (0 = off)",
        )
        need(
            is_num(self.save_every_seconds) and self.save_every_seconds >= 0,
            "save_every_seconds",
            "a number >= 0 (0 = off)",
        )
        need(is_int(self.keep_last) and self.keep_last >= 0, "keep_last", "an integer >= 0 (0 keeps all)")
        need(is_int(self.keep_best) and self.keep_best >= 0, "keep_best", "an integer >= 0")
        need(
            isinstance(self.monitor_metric, str) and self.monitor_metric != "",
            "monitor_metric",
            "a metric name such as 'val/loss'",
        )
        need(self.monitor_mode in ("min", "max"), "monitor_mode", "'min' or 'max'")
        need(isinstance(self.async_save, bool), "async_save", "true or false")
        need(isinstance(self.release_snapshot_buffers, bool), "release_snapshot_buffers", "true or false")
        need(self.on_save_error in ("stop", "continue"), "on_save_error", "'stop' or 'continue'")
        need(isinstance(self.tensorboard, bool), "tensorboard", "true or false")
        device_ok = isinstance(self.device, str) and (
            self.device in ("auto", "cpu", "cuda", "mps")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        )
        need(device_ok, "device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        need(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", "'auto', 'fp32', 'bf16' or 'fp16'")
        need(self.distributed_strategy in ("ddp", "fsdp"), "distributed_strategy", "'ddp' or 'fsdp'")
        need(is_int(self.config_version) and self.config_version >= 1, "config_version", "an integer >= 1")

    # -- construction and serialisation ------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str = "tiny", **overrides: Any) -> TrainingConfig:
        if preset not in PRESETS:
            raise ConfigError(f"config field preset={preset!r} is invalid: allowed one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[preset], "preset": preset, **overrides})

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown_keys"}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build from a plain dict. Keys this version does not know (written by a newer
        version) are reported with a warning and kept in `unknown_keys`, not crashed on."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object (dict), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown_keys"}
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            warnings.warn(
                f"config keys not known to this version were ignored: {sorted(unknown)} "
                "(written by a newer version? upgrade the package to use them)",
                stacklevel=2,
            )
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.unknown_keys = unknown
        return config

    @classmethod
    def from_json(cls, text: str) -> TrainingConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON config file as a dict (it may hold only some fields). Never evaluated as code."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}; check the path") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (is it a JSON config?)") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of field names and values")
    return data
