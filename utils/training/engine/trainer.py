"""The Trainer: builds a run from a Task (the byte LM by default), resumes it from its newest
checkpoint, and hands it to the loop. `train(config, build_task=...)` is the one-call form.

Everything a resume needs is in the checkpoint: weights, optimizer, scheduler, scaler,
every RNG, the data position and the epoch's running sums, so a run resumed from any step
continues bit-identically on CPU. SIGTERM and a notebook interrupt (SIGINT) stop at the
next step boundary with a checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import TrainingConfig
from . import distributed as dist_utils
from .batches import TrainBatches, check_steps
from .checkpoint import CheckpointManager, LoadedCheckpoint, list_leftovers, read_training_state
from .commit import (
    CheckpointCorrupt,
    CheckpointWriteError,
    UnsupportedFormat,
    fsync_dir,
    read_json,
    remove_tree,
    write_json_file,
)
from .devices import resolve_amp_dtype, resolve_device
from .dist_checkpoint import DistributedCheckpointManager, is_distributed_checkpoint, load_distributed, rank_state_file
from .exactness import Continuation, check_continuation, cuda_rng_notice, record_changes
from .loop import Loop
from .metrics_log import METRICS_FILE, STEPS_FILE, StepsLog, remove_stale_temp_logs, rewrite_jsonl, trim_steps_log
from .recovery import RUN_FILE, build_results
from .reproducibility import seed_everything
from .resume import ResumeError, check_compatible, find_resume_checkpoint
from .rollback import ResumePlan, ResumeRefused, apply_resume_plan, branch_from, plan_resume
from .runlock import RunLock
from .stop import StopRequested
from .task import DEFAULT_TASK_PATH, Task, TaskError, build_checked, load_builder
from .tracking import TrainingTracker
from .train_state import Progress, RunningSums, TrainState, build_optimizer, lr_multiplier

__all__ = ["ResumeError", "ResumeRefused", "TaskError", "TaskMismatch", "Trainer", "lr_multiplier", "train"]

log = logging.getLogger(__name__)
events = logging.getLogger("utils.training.events")
Builder = Callable[[TrainingConfig], Task]


class TaskMismatch(ResumeError):
    """The run was trained with another task builder; resuming it needs that one."""

    def __init__(self, checkpoint: Path, recorded: str, given: str) -> None:
        self.checkpoint, self.recorded, self.given = checkpoint, recorded, given
        super().__init__(
            f"checkpoint {checkpoint} was trained with the task builder {recorded!r}, not {given!r}; "
            f"resume it with {recorded!r}, or use a new run name"
        )


def resolve_builder(build_task: Builder | None, task_path: str | None) -> tuple[Builder, str]:
    """(builder, its recorded path): the byte LM by default, an import path, or a function."""
    if build_task is None:
        path = task_path or DEFAULT_TASK_PATH
        return load_builder(path), path
    if task_path is None:
        module = getattr(build_task, "__module__", None) or "__main__"
        task_path = f"{module}:{getattr(build_task, '__qualname__', 'build_task')}"
    return build_task, task_path


class Trainer:
    """Train one run. `fit()` returns the results dict; `model` holds the trained model."""

    def __init__(self, config: TrainingConfig, *, build_task: Builder | None = None, task_path: str | None = None,
                 resume: str = "auto", progress: bool = True) -> None:  # fmt: skip
        if resume not in ("auto", "never") and not Path(resume).exists():
            raise ResumeError(
                f"resume={resume}: no such checkpoint folder; set resume to auto, never or a step-NNNNNN folder"
            )
        self.config = config
        self.builder, self.task_path = resolve_builder(build_task, task_path)
        self.resume = resume
        self.progress = progress
        self.runtime = dist_utils.Runtime.from_env(config.device)
        self.device = resolve_device(config.device) if not self.runtime.device else self.runtime.device
        self.amp_dtype = resolve_amp_dtype(config.precision, self.device)
        self.model: torch.nn.Module | None = None
        self.task: Task | None = None
        self.save_errors: list[str] = []
        self.messages: list[str] = []
        self.set_aside: list[dict[str, str]] = []  # what a rollback or fallback moved to abandoned/
        self._continuation: Continuation | None = None

    def _say(self, message: str) -> None:
        events.info(message)
        self.messages.append(message)

    def fit(self) -> dict[str, Any]:
        rt, run_dir = self.runtime, self.config.run_dir
        lock = RunLock(run_dir) if rt.is_main else None
        try:
            if lock is not None:
                lock.acquire()
                if lock.took_over_stale:
                    self._say(f"took over the lock of {run_dir}, left by a process that no longer runs")
            with StopRequested() as stop:
                return self._fit(run_dir, stop)
        finally:
            if lock is not None:
                lock.release()

    # -- set-up ---------------------------------------------------------------------------
    def _plan_resume(self, run_dir: Path) -> ResumePlan:
        """rollback.py decides where the run continues and what to set aside; nothing moves yet."""
        try:
            plan = plan_resume(run_dir, self.resume)
        except UnsupportedFormat as exc:  # falling back would train on and overwrite a newer version's work
            raise ResumeError(f"{exc}: this run was continued by a newer version of the package") from exc
        if plan.finished_journal:
            self._say(f"finished setting aside what an interrupted rollback left in {run_dir}")
        return plan

    def _find_checkpoint(self, plan: ResumePlan | None) -> tuple[LoadedCheckpoint | None, ResumePlan | None]:
        """The checkpoint the plan names (main process decides, every rank loads the same one)."""
        rt, run_dir = self.runtime, self.config.run_dir
        choice = self.resume if plan is None else str(plan.checkpoint or "")  # "": start fresh
        if plan is not None and plan.checkpoint is not None and self.resume == "auto":
            choice = "auto"  # loading may still fail (a refused pickle): find_resume_checkpoint falls back
        choice = rt.broadcast_object(choice)
        loaded = find_resume_checkpoint(run_dir, choice, say=self._say) if choice else None
        if plan is not None and plan.checkpoint is not None:
            if loaded is None:  # every checkpoint verified by hash, none loads: never start over
                raise ResumeRefused(run_dir, f"{run_dir} has checkpoints but none can be loaded", damaged=[],
                                    choices=["new_run_name", "verify", "resume_never"])  # fmt: skip
            if loaded.path != plan.checkpoint:
                plan = branch_from(run_dir, loaded.path, "set aside by a resume that fell back past it")
        rt.check_same_choice(loaded.step if loaded is not None else -1)
        if loaded is None:
            return None, plan
        recorded = loaded.trainer_state.get("task") or DEFAULT_TASK_PATH
        if recorded != self.task_path:
            raise TaskMismatch(loaded.path, recorded, self.task_path)
        if recorded == DEFAULT_TASK_PATH:
            check_compatible(loaded, self.config)
        return loaded, plan

    def _check_continuation(self, loaded: LoadedCheckpoint, task: Task) -> None:
        """Refuse (ConfigChanged) a resume that would not continue exactly, unless accepted."""
        saved = loaded.trainer_state.get("config") or {}
        self._continuation = check_continuation(
            saved, self.config.to_dict(), step=loaded.step, checkpoint=str(loaded.path),
            saved_fingerprint=loaded.trainer_state.get("corpus_fingerprint"), new_fingerprint=task.data_fingerprint,
            accept=self.config.accept_config_change, model_shape=self.task_path == DEFAULT_TASK_PATH,
            steps_per_epoch=loaded.trainer_state.get("steps_per_epoch"),
        )  # fmt: skip

    def _build_state(self, loaded: LoadedCheckpoint | None) -> TrainState:
        cfg, rt, device = self.config, self.runtime, self.device
        seed_everything(cfg.seed)  # before the builder: the same initial weights every time
        task = build_checked(self.builder, cfg, self.task_path)
        self.task = task
        if loaded is not None:
            self._check_continuation(loaded, task)
        model = task.model.to(device)
        self.model = model
        if loaded is not None:
            try:
                model.load_state_dict(loaded.model_state)
            except RuntimeError as exc:
                raise ResumeError(f"checkpoint {loaded.path} does not fit the task's model: {exc}") from exc
        train_model = rt.wrap_model(model, cfg.distributed_strategy)
        train = TrainBatches(task, batch_size=cfg.batch_size, seed=cfg.seed, rank=rt.rank, world_size=rt.world_size,
                             pin=device.type == "cuda")  # fmt: skip
        steps_per_epoch = check_steps(train, cfg.steps_per_epoch)
        train.set_steps_per_epoch(steps_per_epoch)
        total_steps = cfg.epochs * steps_per_epoch
        optimizer, scheduler = build_optimizer(task, model, cfg, total_steps=total_steps, device=device)
        vocab = task.language_model.vocab_size if task.language_model is not None else None
        ts = TrainState(
            config=cfg, task=task, task_path=self.task_path, model=model, train_model=train_model,
            optimizer=optimizer, scheduler=scheduler,
            scaler=torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16),
            train=train, steps_per_epoch=steps_per_epoch, total_steps=total_steps, device=device,
            progress=Progress(), epoch_sums=RunningSums.fresh(device, vocab), interval_sums=RunningSums.fresh(device, vocab),
        )  # fmt: skip
        if loaded is not None:
            self._restore(ts, loaded)
        return ts

    def _restore(self, ts: TrainState, loaded: LoadedCheckpoint) -> None:
        rt, cfg = self.runtime, self.config
        training_state = loaded.training_state
        own_file = loaded.path / rank_state_file(rt.rank)
        if rt.rank > 0 and own_file.is_file():  # this rank's RNG and running sums (same world size)
            training_state = read_training_state(own_file)
        distributed = is_distributed_checkpoint(loaded.path)
        if distributed:
            load_distributed(loaded.path, ts.train_model, ts.optimizer)
            # dcp/ keeps one copy of each replicated buffer, from whichever rank its planner picked;
            # DDP's forward broadcasts rank 0's, so every rank takes rank 0's (model.safetensors).
            with torch.no_grad():
                for name, buffer in ts.model.named_buffers():
                    if name in loaded.model_state:
                        buffer.copy_(loaded.model_state[name])
        elif rt.distributed and cfg.distributed_strategy == "fsdp":
            raise ResumeError(
                f"{loaded.path} was written by a single process; an FSDP job resumes only from FSDP/DDP "
                "checkpoints. Resume it once with DDP (the default strategy), then switch to FSDP"
            )
        ts.restore(loaded, training_state, load_optimizer=not distributed)
        saved_cuda = len((training_state.get("rng") or {}).get("cuda") or [])
        rng_notice = cuda_rng_notice(saved_cuda, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        notices = self._continuation.notices if self._continuation is not None else []
        for notice in notices + ([rng_notice] if rng_notice else []):
            self._say(notice)
        self._say(f"resumed from {loaded.path} (step {ts.progress.step}, epoch {ts.epoch})")

    def _read_run_info(self, run_dir: Path) -> dict[str, Any] | None:
        if not (run_dir / RUN_FILE).is_file():
            return None
        try:
            info = read_json(run_dir / RUN_FILE, RUN_FILE)  # size-capped, symlinks refused
        except CheckpointCorrupt:
            return None  # informative only: the checkpoint's run id finds the database run
        return info if isinstance(info, dict) else None

    def _set_aside(self, plan: ResumePlan | None) -> None:
        """Every check passed: move what the rollback/fallback leaves behind into abandoned/."""
        if plan is None:
            return
        apply_resume_plan(self.config.run_dir, plan)
        self.set_aside = plan.set_aside
        for item in plan.set_aside:
            self._say(f"set aside {item['path']}: {item['reason']}")

    def _prepare_run_folder(self, ts: TrainState, loaded: LoadedCheckpoint | None, plan: ResumePlan | None) -> None:
        """Main process: leftovers removed, run.json and the database row, logs cut to the checkpoint."""
        cfg, run_dir, p = self.config, self.config.run_dir, ts.progress
        run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in list_leftovers(run_dir):
            self._say(f"removing {leftover.name}: an unfinished save from an earlier process")
            remove_tree(leftover)
        remove_stale_temp_logs(run_dir)  # a kill before a log's rename leaves .metrics.jsonl.tmp-PID
        run_info = self._read_run_info(run_dir)
        ts.db = TrainingTracker(cfg.db_path, warn=self._say)  # best effort: never stops training
        known_ids = [(run_info or {}).get("run_id"), loaded.trainer_state.get("run_id") if loaded else None]
        p.run_id = ts.db.open_run(cfg.run_name, cfg.to_dict(), str(cfg.workspace_root), known_ids=known_ids)
        if p.run_id is None:  # the database is offline: keep the id the run already has
            p.run_id = next((i for i in known_ids if isinstance(i, int) and not isinstance(i, bool)), None)
        if run_info is None or run_info.get("run_id") != p.run_id or run_info.get("task") != self.task_path:
            self._write_run_info(run_dir, p.run_id)
        if self._continuation is not None:
            record_changes(run_dir, self._continuation.changes)
        resumed = loaded is not None
        if resumed and p.step >= ts.total_steps:
            self._say(f"run {cfg.run_name} is already complete at step {p.step}; "
                      "raise epochs to train further, or use a new run name")  # fmt: skip
        elif resumed:
            ts.db.mark_resumed(p.step, abandoned_branch=plan.batch.name if plan and plan.batch else None)
            rewrite_jsonl(run_dir / METRICS_FILE, p.metrics_history)
            ts.db.backfill(p.metrics_history)
        elif (run_dir / METRICS_FILE).exists():
            rewrite_jsonl(run_dir / METRICS_FILE, [])
        trim_steps_log(run_dir / STEPS_FILE, p.step if resumed else 0)

    def _write_run_info(self, run_dir: Path, run_id: int | None) -> None:
        info = {
            "run_id": run_id,
            "run_name": self.config.run_name,
            "task": self.task_path,
            "config": self.config.to_dict(),
            "created_at": time.time(),
            "versions": {"torch": torch.__version__, "format": 1},
        }
        tmp = run_dir / f".{RUN_FILE}.tmp-{os.getpid()}"  # a stale one is removed by the next start
        write_json_file(tmp, info)  # fsynced, then renamed over the old one
        os.replace(tmp, run_dir / RUN_FILE)
        fsync_dir(run_dir)

    def _manager(self, run_dir: Path) -> Any:
        cfg, rt = self.config, self.runtime
        retention = dict(keep_last=cfg.keep_last, keep_best=cfg.keep_best, monitor_metric=cfg.monitor_metric,
                         monitor_mode=cfg.monitor_mode, async_save=cfg.async_save)  # fmt: skip
        if rt.distributed:
            return DistributedCheckpointManager(rt, run_dir, **retention)
        if not rt.is_main:
            return None
        return CheckpointManager(run_dir, **retention, release_buffers=cfg.release_snapshot_buffers)

    # -- the run --------------------------------------------------------------------------
    def _fit(self, run_dir: Path, stop: StopRequested) -> dict[str, Any]:
        rt = self.runtime
        plan = self._plan_resume(run_dir) if rt.is_main else None
        loaded, plan = self._find_checkpoint(plan)
        ts = self._build_state(loaded)
        if rt.is_main:
            self._set_aside(plan)
        steps_log: StepsLog | None = None
        tb: Any = None  # the TensorBoard writer when config.tensorboard is on
        status = "failed"
        try:
            if rt.is_main:
                self._prepare_run_folder(ts, loaded, plan)
                steps_log = StepsLog(run_dir / STEPS_FILE)
                if self.config.tensorboard:  # tensorboard is imported only when it is on
                    from ..integrations.tensorboard import tensorboard_for

                    tb = tensorboard_for(self.config, start_step=ts.progress.step)
            ts.progress.run_id = rt.broadcast_object(ts.progress.run_id)
            ts.manager = self._manager(run_dir)
            loop = Loop(ts, runtime=rt, stop=stop, autocast=self._autocast, say=self._say,
                        on_save_error=self._handle_save_error, steps_log=steps_log, progress=self.progress,
                        tensorboard=tb)  # fmt: skip
            status = loop.run()
            if steps_log is not None:  # a failed final fsync (a full disk) is a failed save
                loop.append_log(steps_log.path, steps_log.close)
            if ts.manager is not None:
                try:
                    ts.manager.close()
                except CheckpointWriteError as exc:  # the last save failed: on_save_error decides
                    self._handle_save_error(exc)
                loop.report_saved()
        except BaseException:
            self._close_after_failure(ts)
            raise
        finally:
            if steps_log is not None and not steps_log.closed:
                try:
                    steps_log.close()
                except OSError:
                    log.exception("could not close %s", steps_log.path)  # never hides the error that stopped training
            if tb is not None:
                tb.close()
            self._finish_db(ts, status)
        rt.barrier()
        results = build_results(run_dir, recovered=False)
        results.update(status=status, messages=self.messages, save_errors=self.save_errors)
        return results

    def _close_after_failure(self, ts: TrainState) -> None:
        if ts.manager is not None and not self.runtime.distributed:  # a collective wait could hang on a dead peer
            ts.manager.close(raise_errors=False)
        if ts.db is not None:
            ts.db.set_status("failed", finished=True)  # best effort: never hides the error that stopped training

    def _finish_db(self, ts: TrainState, status: str) -> None:
        if ts.db is None:
            return
        if status != "failed":
            ts.db.set_status(status, finished=status == "completed")
            manager = ts.manager
            if manager is not None and manager.last_saved_path is not None:
                ts.db.log_artifact("checkpoint", str(manager.last_saved_path), step=ts.progress.step)
        ts.db.close(ts.progress.metrics_history)

    def _autocast(self) -> Any:
        """Mixed precision where the config asks for it (CUDA), a no-op elsewhere."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _handle_save_error(self, exc: CheckpointWriteError) -> None:
        if self.config.on_save_error == "stop":
            raise exc
        self.save_errors.append(str(exc))
        self._say(f"checkpoint save failed, training continues (on_save_error=continue): {exc}")


def train(config: TrainingConfig, *, build_task: Builder | None = None, task_path: str | None = None,
          resume: str = "auto", progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train (or continue) the run described by `config`; returns the results dict.
    `build_task(config) -> Task` (default: the byte LM); `task_path` is what run.json records."""
    return Trainer(config, build_task=build_task, task_path=task_path, resume=resume, progress=progress).fit()
