"""TrainingConfig: every setting of a run, validated, with presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
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


# Upper bounds of the counts: far beyond any real run, low enough that a typo (an extra
# few zeros) is caught before it allocates or loops for ever.
MAX_STEPS = 10**9  # epochs * steps_per_epoch, warmup, save cadence
MAX_STEPS_PER_EPOCH = 10**8
MAX_MODEL_DIM = {"n_layer": 1024, "n_head": 1024, "n_embd": 65536, "context_length": 1 << 20, "batch_size": 1 << 20}
MAX_EVAL_BATCHES = 10**6
MAX_KEEP = 10**6
MAX_CORPUS_BYTES = 1 << 40
# Metric names a run of the built-in model logs; task metrics are train/<name> and val/<name>.
KNOWN_METRICS = (
    "train/loss", "train/perplexity", "val/loss", "val/perplexity", "learning_rate", "grad_norm",
    "epoch_seconds", "tokens_per_second",
)  # fmt: skip
# Settings of one invocation, not of the run: never compared by a resume.
INVOCATION_FIELDS = ("accept_config_change",)


def check_monitor_metric(name: object) -> str | None:
    """None when `name` may be monitored, else the reason (a near miss of a known name)."""
    if not isinstance(name, str) or not name:
        return "a metric name such as 'val/loss'"
    if name in KNOWN_METRICS or name.startswith("drift/"):
        return None
    close = difflib.get_close_matches(name, KNOWN_METRICS, n=1, cutoff=0.75)
    if close:
        return f"a metric the run logs; did you mean {close[0]!r}?"
    head, _, tail = name.partition("/")
    if head in ("train", "val") and tail:
        return None  # a task's own metric
    return f"one of {list(KNOWN_METRICS)} or a task metric 'train/<name>' / 'val/<name>'"


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
    # A resume may continue with a changed batch size, schedule, optimizer setting or data;
    # each change is recorded in run.json. Not part of the run's settings (never compared).
    accept_config_change: bool = False
    # Always empty: unknown keys are errors (kept so older callers that read it still work).
    unknown_keys: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.workspace_root, (str, os.PathLike)):
            raise ConfigError(
                f"config field workspace_root={self.workspace_root!r} is invalid: allowed a folder path (text)"
            )
        self.workspace_root = os.fspath(self.workspace_root)
        if self.corpus is not None and not isinstance(self.corpus, (str, os.PathLike)):
            raise ConfigError(
                f"config field corpus={self.corpus!r} is invalid: allowed a path (text), or null for the default"
            )
        if self.corpus is not None:
            self.corpus = os.fspath(self.corpus)
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
        need(self.corpus != "", "corpus", "a file or folder path, or null (unset) for the default corpus")
        need(
            is_int(self.corpus_max_bytes) and 1024 <= self.corpus_max_bytes <= MAX_CORPUS_BYTES,
            "corpus_max_bytes",
            f"an integer in [1024, {MAX_CORPUS_BYTES}]",
        )
        need(is_num(self.val_fraction) and 0.0 < self.val_fraction < 0.5, "val_fraction", "a number in (0, 0.5)")
        for name, limit in MAX_MODEL_DIM.items():
            need(is_int(getattr(self, name)) and 1 <= getattr(self, name) <= limit, name, f"an integer in [1, {limit}]")
        need(self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head={self.n_head}")
        need(is_num(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)")
        need(is_num(self.learning_rate) and 0 < self.learning_rate <= 1, "learning_rate", "a number in (0, 1]")
        need(is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        need(is_int(self.warmup_steps) and 0 <= self.warmup_steps <= MAX_STEPS, "warmup_steps",
             f"an integer in [0, {MAX_STEPS}]")  # fmt: skip
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_num(self.beta1) and 0 <= self.beta1 < 1, "beta1", "a number in [0, 1)")
        need(is_num(self.beta2) and 0 <= self.beta2 < 1, "beta2", "a number in [0, 1)")
        need(is_num(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 disables)")
        need(is_int(self.epochs) and 1 <= self.epochs <= 100_000, "epochs", "an integer in [1, 100000]")
        need(is_int(self.steps_per_epoch) and 0 <= self.steps_per_epoch <= MAX_STEPS_PER_EPOCH, "steps_per_epoch",
             f"an integer in [0, {MAX_STEPS_PER_EPOCH}] (0 = one full pass over the data)")  # fmt: skip
        need(self.epochs * self.steps_per_epoch <= MAX_STEPS, "steps_per_epoch",
             f"with epochs={self.epochs}, at most {MAX_STEPS} steps in all")  # fmt: skip
        need(is_int(self.eval_batches) and 0 <= self.eval_batches <= MAX_EVAL_BATCHES, "eval_batches",
             f"an integer in [0, {MAX_EVAL_BATCHES}] (0 = all)")  # fmt: skip
        need(is_int(self.log_every_steps) and 0 <= self.log_every_steps <= MAX_STEPS, "log_every_steps",
             f"an integer in [0, {MAX_STEPS}] (0 = off)")  # fmt: skip
        need(isinstance(self.task_options, dict), "task_options", "a JSON object (dict) of the task's own settings")
        need(
            is_int(self.save_every_steps) and 0 <= self.save_every_steps <= MAX_STEPS,
            "save_every_steps",
            f"an integer in [0, {MAX_STEPS}] (0 = off)",
        )
        need(
            is_num(self.save_every_seconds) and self.save_every_seconds >= 0,
            "save_every_seconds",
            "a number >= 0 (0 = off)",
        )
        need(is_int(self.keep_last) and 0 <= self.keep_last <= MAX_KEEP, "keep_last",
             f"an integer in [0, {MAX_KEEP}] (0 keeps all)")  # fmt: skip
        need(is_int(self.keep_best) and 0 <= self.keep_best <= MAX_KEEP, "keep_best", f"an integer in [0, {MAX_KEEP}]")
        metric_problem = check_monitor_metric(self.monitor_metric)
        need(metric_problem is None, "monitor_metric", metric_problem or "")
        need(isinstance(self.accept_config_change, bool), "accept_config_change", "true or false")
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
        need(
            is_int(self.config_version) and 1 <= self.config_version <= CONFIG_VERSION,
            "config_version",
            f"an integer in [1, {CONFIG_VERSION}] (a higher one was written by a newer version: upgrade the package)",
        )

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
        """Build from a plain dict. An unknown key is an error naming the closest known one
        (a misspelt setting must never train silently with the default)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object (dict), got {type(data).__name__}")
        known = sorted({f.name for f in dataclasses.fields(cls)} - {"unknown_keys"})
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
                raise ConfigError(f"unknown config key {key!r}{hint}")
        return cls(**data)

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
