"""The training loop over a TrainState: one step, the logging interval (steps.jsonl), the end of
an epoch (metrics.jsonl, best), and when to save (epoch end, every N steps, every T seconds, on
a stop signal). Read top to bottom it is the story of one batch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .commit import CheckpointWriteError
from .evaluation import epoch_row, reduced_means, snapshot_parameters, top_level_group, update_best, update_ratios
from .metrics_log import METRICS_FILE, StepsLog, append_jsonl
from .stop import StopRequested
from .task import batch_size_of, move_to_device, split_loss_output
from .train_state import TrainState
from .trainer_state import TRAINER_STATE_VERSION

events = logging.getLogger("utils.training.events")
AGREE_EVERY_STEPS = 8  # under torchrun: how often ranks agree on a time-based save or a stop


class Loop:
    """Runs a TrainState to the end of the run, or to a stop signal (with a checkpoint)."""

    def __init__(self, ts: TrainState, *, runtime: Any, stop: StopRequested, autocast: Callable[[], Any],
                 say: Callable[[str], None], on_save_error: Callable[[CheckpointWriteError], None],
                 steps_log: StepsLog | None, progress: bool, tensorboard: Any = None) -> None:  # fmt: skip
        self.ts, self.rt, self.stop, self.autocast = ts, runtime, stop, autocast
        self.say, self.on_save_error, self.steps_log = say, on_save_error, steps_log
        self.tb = tensorboard  # a TensorBoardLogger on the main process when config.tensorboard is on
        self.bar = None
        if progress and runtime.is_main:
            from tqdm.auto import tqdm

            cfg = ts.config
            self.bar = tqdm(total=ts.total_steps, initial=ts.progress.step, desc=cfg.run_name, unit="step",
                            dynamic_ncols=True)  # fmt: skip
        self.group_of = ts.task.parameter_group or top_level_group
        self._reported = ts.manager.saves_completed if ts.manager is not None else 0

    def run(self) -> str:
        ts, cfg = self.ts, self.ts.config
        last_save = session_start = time.monotonic()
        wall_base = ts.progress.wall_seconds
        epoch_start = time.monotonic() - ts.epoch_sums.seconds
        ts.train_model.train()
        try:
            while ts.progress.step < ts.total_steps:
                last_of_epoch = (ts.progress.step + 1) % ts.steps_per_epoch == 0
                before: dict[str, torch.Tensor] | None = {} if last_of_epoch else None
                self._step(before)
                step = ts.progress.step
                reason = None
                if last_of_epoch:
                    self._end_epoch(before, time.monotonic() - epoch_start)
                    reason = "epoch_end"
                    epoch_start = time.monotonic()
                elif cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    reason = "step"
                time_due = bool(cfg.save_every_seconds) and time.monotonic() - last_save >= cfg.save_every_seconds
                stop_now = self.stop.reason is not None
                if self.rt.distributed:  # ranks agree every few steps: one tiny collective, not one per step
                    agree = step % AGREE_EVERY_STEPS == 0 or step == ts.total_steps
                    time_due, stop_now = self.rt.any_true(time_due, stop_now) if agree else (False, False)
                stop_reason = (self.stop.reason or "a signal to another rank") if stop_now else None
                if reason is None and time_due:
                    reason = "time"
                if reason is None and stop_reason is not None:
                    reason = "signal"
                if reason is not None:
                    ts.epoch_sums.seconds = time.monotonic() - epoch_start
                    ts.progress.wall_seconds = wall_base + time.monotonic() - session_start
                    self.save(reason)
                    last_save = time.monotonic()
                if ts.manager is not None:
                    self._surface_save_error()
                if stop_reason is not None:
                    self.say(
                        f"stopped by {stop_reason} at step {step}; checkpoint saved; start the same training again to resume"
                    )
                    return "interrupted"
            return "completed"
        finally:
            if self.bar is not None:
                self.bar.close()

    def _step(self, before: dict[str, torch.Tensor] | None) -> None:
        ts, cfg = self.ts, self.ts.config
        batch = ts.train.next_batch()
        lm = ts.task.language_model
        if lm is not None:  # the token histogram for drift is counted on the host: no device sync
            ts.epoch_sums.token_counts += torch.bincount(lm.inputs(batch).reshape(-1), minlength=lm.vocab_size)
        size = batch_size_of(batch)
        batch = move_to_device(batch, ts.device, non_blocking=True)
        with self.autocast():
            loss, metrics = split_loss_output(ts.task.loss_fn(ts.train_model, batch))
        ts.scaler.scale(loss).backward()
        ts.scaler.unscale_(ts.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(ts.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor already reduced across ranks
            grad_norm = grad_norm.full_tensor()
        if before is not None:
            before.update(snapshot_parameters(ts.model))  # the weights just before the epoch's last update
        if ts.manager is not None:
            ts.manager.wait_for_snapshot()  # a save in flight may still be copying this state
        ts.scaler.step(ts.optimizer)
        ts.scaler.update()
        ts.optimizer.zero_grad(set_to_none=True)
        if ts.scheduler is not None:
            ts.scheduler.step()
        ts.progress.step += 1
        loss = loss.float()
        ts.epoch_sums.add(loss, metrics, size, grad_norm)
        ts.interval_sums.add(loss, metrics, size, grad_norm)
        step = ts.progress.step
        if cfg.log_every_steps and step % cfg.log_every_steps == 0:
            self._log_interval()
        if self.bar is not None:
            self.bar.update(1)
            if step % 25 == 0:
                self.bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    def _log_interval(self) -> None:
        ts = self.ts
        means = reduced_means(ts, ts.interval_sums, self.rt)
        step = ts.progress.step
        row: dict[str, Any] = {"step": step, "epoch": (step - 1) // ts.steps_per_epoch + 1, "train/loss": means["loss"]}
        row.update({f"train/{k[7:]}": v for k, v in means.items() if k.startswith("metric/")})
        row.update(learning_rate=ts.learning_rate(), grad_norm=means["grad_norm"], time=time.time())
        ts.interval_sums = ts.fresh_sums()
        if self.steps_log is not None:
            self.append_log(self.steps_log.path, lambda: self.steps_log.append(row))
        if self.tb is not None:
            self.tb.log_step(row["step"], row)

    def append_log(self, path: Path, append: Callable[[], None]) -> None:
        """A failed append of a log line (a full disk) is a failed save: on_save_error decides.
        Nothing is lost: the checkpoint carries the rows, and a resume rewrites the logs from it."""
        try:
            append()
        except OSError as exc:
            self.on_save_error(CheckpointWriteError(path, f"could not append to {path.name}: {exc.strerror or exc}",
                                                    "free disk space; a resume rewrites the log from the checkpoint"))  # fmt: skip

    def _end_epoch(self, before: dict[str, torch.Tensor] | None, epoch_seconds: float) -> None:
        ts = self.ts
        ratios = update_ratios(before, ts.model, self.group_of) if before else {}
        row = epoch_row(ts, runtime=self.rt, autocast=self.autocast, update_ratio=ratios, epoch_seconds=epoch_seconds)
        ts.progress.metrics_history.append(row)
        update_best(ts, row, self.say)
        # The epoch is done: its sums are in the row, and the checkpoint carries the next epoch's
        # (empty) ones, or a resume would count this epoch twice.
        ts.epoch_sums = ts.fresh_sums()
        if self.bar is not None and "val/loss" in row:
            self.bar.set_postfix(loss=f"{row['train/loss']:.3f}", val_loss=f"{row['val/loss']:.3f}", refresh=True)
        if not self.rt.is_main:
            return
        metrics_file = ts.config.run_dir / METRICS_FILE
        self.append_log(metrics_file, lambda: append_jsonl(metrics_file, row))
        if self.tb is not None:
            self.tb.log_epoch(row["step"], row)
            self.tb.flush()
        shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("train/", "val/")))
        events.info("epoch %d (step %d): %s", row["epoch"], row["step"], shown, extra={"epoch_row": row})
        if ts.db is not None:
            ts.db.log_epoch(row)  # best effort (tracking.py): the database never stops training

    def _surface_save_error(self) -> None:
        manager = self.ts.manager
        try:
            manager.check()
        except CheckpointWriteError as exc:
            self.on_save_error(exc)
        self.report_saved()

    def report_saved(self) -> None:
        """One event per checkpoint committed since the last call (async saves commit later)."""
        manager = self.ts.manager
        if manager is not None and manager.saves_completed > self._reported and manager.last_saved_path is not None:
            self._reported = manager.saves_completed
            events.info("checkpoint %s saved", manager.last_saved_path.name)

    def save(self, reason: str) -> None:
        ts, p = self.ts, self.ts.progress
        if ts.manager is None:
            return
        if self.steps_log is not None:  # every step line up to this checkpoint is on disk before it commits
            self.append_log(self.steps_log.path, self.steps_log.sync)
        if self.tb is not None:  # its events up to this checkpoint too: a resume purges only those past it
            self.tb.flush()
        metrics = p.metrics_history[-1] if reason == "epoch_end" and p.metrics_history else {}
        manifest_fields = {"epoch": ts.epoch, "reason": reason,
                           "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}  # fmt: skip
        try:
            ts.manager.save(p.step, model=ts.train_model, optimizer=ts.optimizer, training_state=ts.training_state(),
                            trainer_state=trainer_state(ts, reason, self.rt.world_size),
                            manifest_fields=manifest_fields)  # fmt: skip
        except CheckpointWriteError as exc:
            self.on_save_error(exc)


def trainer_state(ts: TrainState, reason: str, world_size: int) -> dict[str, Any]:
    """trainer_state.json: step, epoch, histories, best, config and the task's builder path."""
    cfg, p = ts.config, ts.progress
    return {
        "format_version": TRAINER_STATE_VERSION,
        "run_name": cfg.run_name,
        "run_id": p.run_id,
        "step": p.step,
        "epoch": ts.epoch,
        "step_in_epoch": p.step - ts.epoch * ts.steps_per_epoch,
        "steps_per_epoch": ts.steps_per_epoch,
        "total_steps": ts.total_steps,
        "completed": p.step >= ts.total_steps,
        "reason": reason,
        "saved_at": time.time(),
        "resume_count": p.resume_count,
        "wall_seconds": p.wall_seconds,
        "metrics_history": p.metrics_history,
        "best": p.best,
        "config": cfg.to_dict(),
        "world_size": world_size,
        "corpus_fingerprint": ts.task.data_fingerprint,
        "task": ts.task_path,
    }
