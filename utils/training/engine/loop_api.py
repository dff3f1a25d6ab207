"""CheckpointedRun: the loop-level API, for people who keep their own training loop. It restores,
logs step and epoch metrics, saves on a cadence (in the background) and closes, in the same
on-disk format as the Trainer, so recovery, the cells, the dashboard and export work on it.

    with CheckpointedRun("./training_output", "my-run", model=model, optimizer=opt) as run:
        step = run.restore()                  # 0 when new
        while step < total:
            loss = train_one_step(...)
            step += 1
            run.log(step, {"loss": loss})
            run.maybe_save(step)
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from ..config import TrainingConfig
from .checkpoint import CheckpointManager, list_leftovers, step_dir_name
from .commit import fsync_dir, remove_tree, write_json_file
from .metrics_log import (
    METRICS_FILE,
    STEPS_FILE,
    StepsLog,
    append_jsonl,
    remove_stale_temp_logs,
    rewrite_jsonl,
    trim_steps_log,
)
from .recovery import RUN_FILE
from .reproducibility import rng_state, set_rng_state
from .resume import find_resume_checkpoint
from .rollback import ResumeRefused, apply_resume_plan, branch_from, plan_resume
from .runlock import RunLock
from .trainer_state import TRAINER_STATE_VERSION

events = logging.getLogger("utils.training.events")
LOOP_TASK = "loop:CheckpointedRun"  # what run.json records as the builder of a hand-written loop


class CheckpointedRun:
    """One run of a hand-written loop. `step` counts completed steps: after `save(n)`, a later
    `restore()` returns n. Exact for the model, optimizer, scheduler, the process RNGs and
    `data` (when it has state_dict/load_state_dict). Saves are asynchronous by default: the
    optimizer's next `step()` waits until the save has copied the state it changes."""

    def __init__(self, workspace: str | os.PathLike, run_name: str, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any = None, data: Any = None,
                 config: TrainingConfig | None = None) -> None:  # fmt: skip
        base = config or TrainingConfig()
        self.config = base.replace(workspace_root=str(workspace), run_name=run_name)
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.run_dir = self.config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.run_dir)
        self._lock.acquire()
        cfg = self.config
        self.manager = CheckpointManager(self.run_dir, keep_last=cfg.keep_last, keep_best=cfg.keep_best,
                                         monitor_metric=cfg.monitor_metric, monitor_mode=cfg.monitor_mode,
                                         async_save=cfg.async_save,
                                         release_buffers=cfg.release_snapshot_buffers)  # fmt: skip
        self._hook = optimizer.register_step_pre_hook(lambda *_: self.manager.wait_for_snapshot())
        self.metrics_history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.epoch = 0  # completed epochs
        self.step = 0
        self._steps_log: StepsLog | None = None
        self._last_save = time.monotonic()
        self._restored = False
        self._saved_step: int | None = None
        self._closed = False

    def __enter__(self) -> CheckpointedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restore ---------------------------------------------------------------------------
    def restore(self) -> int:
        """Load the newest checkpoint that verifies (falling back past damaged ones, which are set
        aside in abandoned/) and return its step; 0 for a new run. Logs past that step (a crashed
        process's) are cut back. Checkpoints exist but none verifies, or the folder cannot be
        listed: ResumeRefused / CheckpointListingError, and nothing on disk changes."""
        plan = plan_resume(self.run_dir, "auto")
        loaded = find_resume_checkpoint(self.run_dir, "auto", say=events.warning) if plan.checkpoint else None
        if plan.checkpoint is not None:
            if loaded is None:  # every checkpoint verified by hash, none loads: never start over
                raise ResumeRefused(self.run_dir, f"{self.run_dir} has checkpoints but none can be loaded",
                                    damaged=[], choices=["new_run_name", "verify"])  # fmt: skip
            if loaded.path != plan.checkpoint:
                plan = branch_from(self.run_dir, loaded.path, "set aside by a resume that fell back past it")
        apply_resume_plan(self.run_dir, plan)
        for item in plan.set_aside:
            events.warning("set aside %s: %s", item["path"], item["reason"])
        for leftover in list_leftovers(self.run_dir):
            remove_tree(leftover)
        remove_stale_temp_logs(self.run_dir)
        if loaded is not None:
            state = loaded.training_state
            self.model.load_state_dict(loaded.model_state)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler"):
                self.scheduler.load_state_dict(state["scheduler"])
            if self.data is not None and state.get("data") is not None:
                self.data.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            ts = loaded.trainer_state
            self.step, self.epoch = int(ts.get("step", loaded.step)), int(ts.get("epoch", 0))
            self.metrics_history = list(ts.get("metrics_history", []))
            self.best = ts.get("best")
            events.info("resumed from %s (step %d, epoch %d)", loaded.path, self.step, self.epoch)
        rewrite_jsonl(self.run_dir / METRICS_FILE, self.metrics_history)
        trim_steps_log(self.run_dir / STEPS_FILE, self.step)
        self._write_run_info()
        self._restored = True
        self._saved_step = self.step if loaded is not None else None
        return self.step

    def _write_run_info(self) -> None:
        info = {"run_id": None, "run_name": self.config.run_name, "task": LOOP_TASK, "config": self.config.to_dict(),
                "created_at": time.time(), "versions": {"torch": torch.__version__, "format": 1}}  # fmt: skip
        tmp = self.run_dir / f".{RUN_FILE}.tmp-{os.getpid()}"  # a stale one is removed by the next restore
        write_json_file(tmp, info)
        os.replace(tmp, self.run_dir / RUN_FILE)
        fsync_dir(self.run_dir)

    def _need_restore(self) -> None:
        if not self._restored:
            raise RuntimeError("call run.restore() first: it says where to continue, and cuts back stale logs")

    # -- logging ---------------------------------------------------------------------------
    def _learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @staticmethod
    def _named(metrics: dict[str, Any]) -> dict[str, float]:
        """Bare names are training metrics (`loss` -> `train/loss`); `val/...` names, `grad_norm` and
        `learning_rate` stay as they are."""
        kept = ("grad_norm", "learning_rate")
        return {(k if "/" in k or k in kept else f"train/{k}"): float(v) for k, v in metrics.items()}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One steps.jsonl line at `step` (completed steps)."""
        self._need_restore()
        self.step = step
        if self._steps_log is None:
            self._steps_log = StepsLog(self.run_dir / STEPS_FILE)
        row = {"step": step, "epoch": self.epoch + 1, "learning_rate": self._learning_rate(), **self._named(metrics),
               "time": time.time()}  # fmt: skip
        self._steps_log.append(row)

    def end_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """One metrics.jsonl row for a completed epoch (1-based); `val/<name>` keys are kept as given."""
        self._need_restore()
        row = {"epoch": epoch, "step": self.step, "learning_rate": self._learning_rate(), **self._named(metrics),
               "time": time.time()}  # fmt: skip
        self.epoch = epoch
        self.metrics_history.append(row)
        append_jsonl(self.run_dir / METRICS_FILE, row)
        events.info("epoch %d (step %d)", epoch, self.step, extra={"epoch_row": row})
        value, cfg = row.get(self.config.monitor_metric), self.config
        if isinstance(value, float) and math.isfinite(value):
            best = self.best.get("value") if self.best else None
            if best is None or (value < best if cfg.monitor_mode == "min" else value > best):
                self.best = {"metric": cfg.monitor_metric, "mode": cfg.monitor_mode, "value": value,
                             "step": self.step, "epoch": epoch, "checkpoint": step_dir_name(self.step)}  # fmt: skip

    # -- saving ----------------------------------------------------------------------------
    def maybe_save(self, step: int) -> bool:
        """Save when the config's cadence says so (every save_every_steps, or save_every_seconds)."""
        cfg = self.config
        self.step = step
        due = bool(cfg.save_every_steps) and step % cfg.save_every_steps == 0
        due = due or (bool(cfg.save_every_seconds) and time.monotonic() - self._last_save >= cfg.save_every_seconds)
        if due:
            self.save(step)
        return due

    def save(self, step: int) -> None:
        """Checkpoint `step` (completed steps): handed to the background writer, committed atomically.
        The step already saved (or just restored) is not written again."""
        self._need_restore()
        self.step = step
        if step == self._saved_step:
            return
        self._saved_step = step
        if self._steps_log is not None:
            self._steps_log.sync()
        training_state = {"scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                          "rng": rng_state(), "data": self.data.state_dict() if self.data is not None else None}  # fmt: skip
        trainer_state = {
            "format_version": TRAINER_STATE_VERSION, "run_name": self.config.run_name, "run_id": None,
            "step": step, "epoch": self.epoch, "reason": "step", "saved_at": time.time(),
            "metrics_history": self.metrics_history, "best": self.best, "config": self.config.to_dict(),
            "world_size": 1, "task": LOOP_TASK, "completed": False,
        }  # fmt: skip
        last = self.metrics_history[-1] if self.metrics_history else {}
        fields = {"epoch": self.epoch, "reason": "step",
                  "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float))}}  # fmt: skip
        self.manager.save(step, model=self.model, optimizer=self.optimizer, training_state=training_state,
                          trainer_state=trainer_state, manifest_fields=fields)  # fmt: skip
        self._last_save = time.monotonic()

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish the save in flight, close the logs, release the run."""
        if self._closed:
            return
        self._closed = True
        try:
            self.manager.close(raise_errors=self.config.on_save_error == "stop")  # continue: logged, not raised
        finally:
            self._hook.remove()
            if self._steps_log is not None:
                self._steps_log.close()
            self._lock.release()
