"""The training loop: AdamW, warmup + cosine LR, grad clipping, AMP on CUDA, evaluation each
epoch, drift metrics, and checkpoints at epoch ends, every N steps and every T seconds.

Everything a resume needs is in the checkpoint: weights, optimizer, scheduler, scaler,
every RNG, the data position and the epoch's running sums, so a run resumed from any step
continues bit-identically on CPU. SIGTERM and a notebook interrupt (SIGINT) stop at the
next step boundary with a checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import TrainingConfig
from . import distributed as dist_utils
from .checkpoint import (
    CheckpointManager,
    list_leftovers,
    step_dir_name,
)
from .commit import (
    CheckpointCorrupt,
    CheckpointWriteError,
    UnsupportedFormat,
    fsync_dir,
    read_json,
    remove_tree,
    write_json_file,
)
from .data import BatchStream, Corpus, token_histogram, validation_batches
from .devices import resolve_amp_dtype, resolve_device
from .dist_checkpoint import DistributedCheckpointManager
from .drift import epoch_drift, snapshot_parameters, update_ratios
from .exactness import check_continuation, cuda_rng_notice, record_changes
from .metrics_log import METRICS_FILE, append_jsonl, remove_stale_temp_logs, rewrite_jsonl
from .model import ByteTransformer
from .recovery import RUN_FILE, build_results
from .reproducibility import rng_state, seed_everything
from .resume import ResumeError, check_compatible, find_resume_checkpoint, restore_training_state
from .rollback import ResumePlan, ResumeRefused, apply_resume_plan, branch_from, plan_resume
from .runlock import RunLock
from .stop import StopRequested
from .tracking import TrainingTracker
from .trainer_state import TRAINER_STATE_VERSION

log = logging.getLogger(__name__)
AGREE_EVERY_STEPS = 8  # under torchrun: how often ranks agree on a time-based save or a stop


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Train one run. `fit()` returns the results dict; `model` holds the trained model."""

    def __init__(self, config: TrainingConfig, *, resume: str = "auto", progress: bool = True) -> None:
        if resume not in ("auto", "never") and not Path(resume).exists():
            raise ResumeError(f"--resume {resume}: no such checkpoint folder; pass auto, never or a step-NNNNNN folder")
        self.config = config
        self.resume = resume
        self.progress = progress
        self.runtime = dist_utils.Runtime.from_env(config.device)
        self.device = resolve_device(config.device) if not self.runtime.device else self.runtime.device
        self.amp_dtype = resolve_amp_dtype(config.precision, self.device)
        self.model: torch.nn.Module | None = None
        self.save_errors: list[str] = []
        self.messages: list[str] = []
        self.set_aside: list[dict[str, str]] = []  # what a rollback or fallback moved to abandoned/

    # -- set-up ---------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        log.info(message)
        self.messages.append(message)

    def _plan_resume(self, run_dir: Path) -> ResumePlan:
        try:
            plan = plan_resume(run_dir, self.resume)
        except UnsupportedFormat as exc:  # falling back would train on and overwrite a newer version's work
            raise ResumeError(f"{exc}: this run was continued by a newer version of the package") from exc
        if plan.finished_journal:
            self._say(f"finished setting aside what an interrupted rollback left in {run_dir}")
        return plan

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.config
        rt = self.runtime
        run_dir = cfg.run_dir
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

    def _fit(self, run_dir: Path, stop: StopRequested) -> dict[str, Any]:
        cfg, rt, device = self.config, self.runtime, self.device
        seed_everything(cfg.seed)
        plan = self._plan_resume(run_dir) if rt.is_main else None  # rollback.py: decide, move nothing yet
        corpus = Corpus.load(
            cfg.corpus, max_bytes=cfg.corpus_max_bytes, val_fraction=cfg.val_fraction, context_length=cfg.context_length,
            run_dir=run_dir, write_snapshot=rt.is_main,
        )  # fmt: skip
        self.corpus_fingerprint = corpus.fingerprint
        model = ByteTransformer.from_config(cfg).to(device)
        self.model = model
        choice = self.resume if plan is None else str(plan.checkpoint or "")  # "": start fresh
        if plan is not None and plan.checkpoint is not None and self.resume == "auto":
            choice = "auto"  # loading may still fail (a refused pickle): find_resume_checkpoint falls back
        choice = rt.broadcast_object(choice)
        loaded = find_resume_checkpoint(cfg.run_dir, choice, say=self._say) if choice else None
        if plan is not None and plan.checkpoint is not None:
            if loaded is None:  # every checkpoint verified by hash, none loads: never start over
                raise ResumeRefused(run_dir, f"{run_dir} has checkpoints but none can be loaded", damaged=[],
                                    choices=["new_run_name", "verify", "resume_never"])  # fmt: skip
            if loaded.path != plan.checkpoint:
                plan = branch_from(run_dir, loaded.path, "set aside by a resume that fell back past it")
        rt.check_same_choice(loaded.step if loaded is not None else -1)
        continuation = None
        if loaded is not None:
            check_compatible(loaded, cfg)
            continuation = check_continuation(
                loaded.trainer_state.get("config") or {}, cfg.to_dict(), step=loaded.step, checkpoint=str(loaded.path),
                saved_fingerprint=loaded.trainer_state.get("corpus_fingerprint"), new_fingerprint=corpus.fingerprint,
                accept=cfg.accept_config_change,
            )  # fmt: skip
            model.load_state_dict(loaded.model_state)
        if plan is not None:  # every check passed: set aside what the rollback/fallback leaves behind
            apply_resume_plan(run_dir, plan)
            self.set_aside = plan.set_aside
            for item in plan.set_aside:
                self._say(f"set aside {item['path']}: {item['reason']}")
        train_model = rt.wrap_model(model, cfg.distributed_strategy)

        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2),
            # Fused kernels on CUDA; on the CPU the multi-tensor path, ~2x faster than the default loop.
            **({"fused": True} if device.type == "cuda" else {"foreach": True}),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(
                s, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps, min_lr_ratio=cfg.min_lr_ratio
            ),
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        stream = BatchStream(
            corpus.train, batch_size=cfg.batch_size, context_length=cfg.context_length, seed=cfg.seed, rank=rt.rank
        )
        val_batches = validation_batches(
            corpus.val,
            count=cfg.eval_batches,
            batch_size=cfg.batch_size,
            context_length=cfg.context_length,
            seed=cfg.seed,
        )
        val_counts = token_histogram(corpus.val)
        probe = val_batches[0][0][: min(4, cfg.batch_size)].to(device)

        # Per-epoch running sums live on the device (no host sync per step) and in checkpoints.
        acc = self._fresh_accumulators(device)
        state: dict[str, Any] = {
            "step": 0, "epoch": 0, "metrics_history": [], "best": None,
            "resume_count": 0, "wall_seconds": 0.0,
        }  # fmt: skip
        run_info: dict[str, Any] | None = None
        if (run_dir / RUN_FILE).is_file():
            try:
                run_info = read_json(run_dir / RUN_FILE, RUN_FILE)  # size-capped, symlinks refused
            except CheckpointCorrupt:
                run_info = None  # informative only: a fresh one is written below
            if not isinstance(run_info, dict):
                run_info = None
        if loaded is not None:
            restore_training_state(
                loaded, rt, cfg, train_model=train_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                stream=stream, acc=acc, state=state,
            )  # fmt: skip
            saved_cuda = len((loaded.training_state.get("rng") or {}).get("cuda") or [])
            rng_notice = cuda_rng_notice(saved_cuda, torch.cuda.device_count() if torch.cuda.is_available() else 0)
            for notice in (continuation.notices if continuation is not None else []) + [rng_notice] * bool(rng_notice):
                self._say(notice)
            self._say(f"resumed from {loaded.path} (step {state['step']}, epoch {state['epoch']})")

        db: TrainingTracker | None = None
        manager: CheckpointManager | None = None
        status = "failed"
        try:
            if rt.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                self._clean_leftovers(run_dir)
                db = TrainingTracker(cfg.db_path, warn=self._say)  # best effort: never stops training
                known_ids = [(run_info or {}).get("run_id"), loaded.trainer_state.get("run_id") if loaded else None]
                run_id = db.open_run(cfg.run_name, cfg.to_dict(), str(cfg.workspace_root), known_ids=known_ids)
                if run_id is None:  # the database is offline: keep the id the run already has
                    run_id = next((i for i in known_ids if isinstance(i, int)), None)
                if run_info is None or run_info.get("run_id") != run_id:
                    self._write_run_info(run_dir, run_id)
                if continuation is not None:
                    record_changes(run_dir, continuation.changes)
                if loaded is not None and state["step"] >= cfg.total_steps:
                    self._say(
                        f"run {cfg.run_name} is already complete at step {state['step']}; "
                        "raise epochs to train further, or use a new run name"
                    )
                elif loaded is not None:
                    db.mark_resumed(state["step"], abandoned_branch=plan.batch.name if plan and plan.batch else None)
                    rewrite_jsonl(run_dir / METRICS_FILE, state["metrics_history"])
                    db.backfill(state["metrics_history"])
                elif (run_dir / METRICS_FILE).exists():
                    rewrite_jsonl(run_dir / METRICS_FILE, [])
            else:
                run_id = None
            state["run_id"] = run_id = rt.broadcast_object(run_id)
            retention = dict(keep_last=cfg.keep_last, keep_best=cfg.keep_best, monitor_metric=cfg.monitor_metric,
                             monitor_mode=cfg.monitor_mode, async_save=cfg.async_save)  # fmt: skip
            if rt.distributed:
                manager = DistributedCheckpointManager(rt, run_dir, **retention)
            elif rt.is_main:
                manager = CheckpointManager(run_dir, **retention)

            status = self._loop(
                train_model, model, optimizer, scheduler, scaler, stream, val_batches, val_counts, probe,
                acc, state, manager, db, run_id, stop,
            )  # fmt: skip
            if manager is not None:
                try:
                    manager.close()
                except CheckpointWriteError as exc:  # the last save failed: on_save_error decides
                    self._handle_save_error(exc)
        except BaseException:
            if manager is not None and not rt.distributed:  # a collective wait could hang on a dead peer
                manager.close(raise_errors=False)
            if db is not None:
                db.set_status("failed", finished=True)  # best effort: never hides the error that stopped training
            raise
        finally:
            if db is not None and status != "failed":
                db.set_status(status, finished=status == "completed")
                if manager is not None and manager.last_saved_path is not None:
                    db.log_artifact("checkpoint", str(manager.last_saved_path), step=state["step"])
            if db is not None:
                db.close(state["metrics_history"])
        rt.barrier()
        results = build_results(run_dir, recovered=False)
        results.update(status=status, messages=self.messages, save_errors=self.save_errors)
        return results

    @staticmethod
    def _fresh_accumulators(device: torch.device) -> dict[str, Any]:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return {
            "loss_sum": zero.clone(), "grad_norm_sum": zero.clone(), "grad_norm_sq_sum": zero.clone(),
            "token_counts": torch.zeros(256, dtype=torch.int64),  # on the host (see _loop)
            "steps": 0, "seconds": 0.0,
        }  # fmt: skip

    def _clean_leftovers(self, run_dir: Path) -> None:
        for leftover in list_leftovers(run_dir):
            self._say(f"removing {leftover.name}: an unfinished save from an earlier process")
            remove_tree(leftover)
        remove_stale_temp_logs(run_dir)  # a kill before a log's rename leaves .metrics.jsonl.tmp-PID

    def _write_run_info(self, run_dir: Path, run_id: int) -> None:
        info = {
            "run_id": run_id,
            "run_name": self.config.run_name,
            "config": self.config.to_dict(),
            "created_at": time.time(),
            "versions": {"torch": torch.__version__, "format": 1},
        }
        tmp = run_dir / f".{RUN_FILE}.tmp"
        write_json_file(tmp, info)  # fsynced, then renamed over the old one
        os.replace(tmp, run_dir / RUN_FILE)
        fsync_dir(run_dir)

    def _loop(self, train_model, model, optimizer, scheduler, scaler, stream, val_batches, val_counts, probe,
              acc, state, manager, db, run_id, stop) -> str:  # fmt: skip
        cfg, rt, device = self.config, self.runtime, self.device
        tokens_per_step = cfg.batch_size * cfg.context_length * rt.world_size
        pin = device.type == "cuda"
        bar = None
        if self.progress and rt.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.total_steps, initial=state["step"], desc=cfg.run_name, unit="step", dynamic_ncols=True)
        last_save_time = session_start = time.monotonic()
        wall_base = state["wall_seconds"]
        epoch_start = time.monotonic() - acc["seconds"]
        train_model.train()
        try:
            while state["step"] < cfg.total_steps:
                step = state["step"]
                last_of_epoch = (step + 1) % cfg.steps_per_epoch == 0
                x_cpu, y_cpu = stream.next_batch()
                # The byte histogram for drift is counted on the host: no device sync per step.
                acc["token_counts"] += torch.bincount(x_cpu.view(-1), minlength=256)
                if pin:
                    x_cpu, y_cpu = x_cpu.pin_memory(), y_cpu.pin_memory()
                x = x_cpu.to(device, non_blocking=True)
                y = y_cpu.to(device, non_blocking=True)
                with self._autocast():
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor already reduced across ranks
                    grad_norm = grad_norm.full_tensor()
                before = snapshot_parameters(model) if last_of_epoch else None
                if manager is not None:
                    manager.wait_for_snapshot()  # a save in flight may still be copying this state
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] = step = step + 1
                acc["loss_sum"] += loss.detach().double()
                acc["grad_norm_sum"] += grad_norm.detach().double()
                acc["grad_norm_sq_sum"] += grad_norm.detach().double() ** 2
                acc["steps"] += 1
                if bar is not None:
                    bar.update(1)
                    if step % 25 == 0 or last_of_epoch:
                        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

                reason = None
                if last_of_epoch:
                    self._end_epoch(model, val_batches, val_counts, probe, acc, state, before, scheduler,
                                    tokens_per_step, time.monotonic() - epoch_start, run_id, db)  # fmt: skip
                    reason = "epoch_end"
                    # The epoch is done: its sums are in the metrics row, and the checkpoint must
                    # carry the next epoch's (empty) ones, or a resume would count this epoch twice.
                    acc = self._fresh_accumulators(device)
                    epoch_start = time.monotonic()
                elif cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    reason = "step"
                time_due = bool(cfg.save_every_seconds) and time.monotonic() - last_save_time >= cfg.save_every_seconds
                stop_now = stop.reason is not None
                if rt.distributed:  # ranks agree every few steps: one tiny collective, not one per step
                    agree = step % AGREE_EVERY_STEPS == 0 or step == cfg.total_steps
                    time_due, stop_now = rt.any_true(time_due, stop_now) if agree else (False, False)
                stop_reason = (stop.reason or "a signal to another rank") if stop_now else None
                if reason is None and time_due:
                    reason = "time"
                if reason is None and stop_reason is not None:
                    reason = "signal"
                if reason is not None:
                    acc["seconds"] = time.monotonic() - epoch_start
                    state["wall_seconds"] = wall_base + time.monotonic() - session_start
                    self._save(manager, train_model, optimizer, scheduler, scaler, stream, acc, state, reason)
                    last_save_time = time.monotonic()
                if manager is not None:
                    self._surface_save_error(manager)
                if stop_reason is not None:
                    self._say(
                        f"stopped by {stop_reason} at step {step}; checkpoint saved, resume with the same command"
                    )
                    return "interrupted"
            return "completed"
        finally:
            if bar is not None:
                bar.close()

    def _autocast(self) -> Any:
        """Mixed precision where the config asks for it (CUDA), a no-op elsewhere."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _surface_save_error(self, manager: CheckpointManager) -> None:
        try:
            manager.check()
        except CheckpointWriteError as exc:
            self._handle_save_error(exc)

    def _handle_save_error(self, exc: CheckpointWriteError) -> None:
        if self.config.on_save_error == "stop":
            raise exc
        self.save_errors.append(str(exc))
        self._say(f"checkpoint save failed, training continues (on_save_error=continue): {exc}")

    @torch.no_grad()
    def _evaluate(self, model, val_batches) -> float:
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in val_batches:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = model(x)
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)).double()
        model.train()
        return float(total) / len(val_batches)

    def _end_epoch(self, model, val_batches, val_counts, probe, acc, state, before, scheduler, tokens_per_step,
                   epoch_seconds, run_id, db) -> None:  # fmt: skip
        cfg, rt = self.config, self.runtime
        epoch = state["step"] // cfg.steps_per_epoch
        sums = rt.all_reduce_sum(torch.stack([acc["loss_sum"], acc["grad_norm_sum"], acc["grad_norm_sq_sum"]]).double())
        steps = acc["steps"]
        train_loss = float(sums[0]) / (steps * rt.world_size)
        val_loss = self._evaluate(model, val_batches)
        drift = epoch_drift(
            model=model,
            probe=probe,
            train_token_counts=rt.all_reduce_sum(acc["token_counts"]).cpu(),
            val_token_counts=val_counts,
            grad_norm_sum=float(sums[1]) / rt.world_size,
            grad_norm_sq_sum=float(sums[2]) / rt.world_size,
            steps=steps,
            update_ratio=update_ratios(before, model),
            previous_entropy=state["metrics_history"][-1].get("drift/probe_entropy")
            if state["metrics_history"]
            else None,
        )
        row = {
            "epoch": epoch,
            "step": state["step"],
            "train/loss": train_loss,
            "train/perplexity": math.exp(min(train_loss, 50.0)),
            "val/loss": val_loss,
            "val/perplexity": math.exp(min(val_loss, 50.0)),
            "learning_rate": scheduler.get_last_lr()[0],
            "grad_norm": float(sums[1]) / (steps * rt.world_size),
            "epoch_seconds": epoch_seconds,
            "tokens_per_second": steps * tokens_per_step / max(epoch_seconds, 1e-9),
            "time": time.time(),
            **drift,
        }
        state["metrics_history"].append(row)
        monitored = row.get(cfg.monitor_metric)
        best = state["best"]
        if isinstance(monitored, (int, float)) and math.isfinite(monitored):
            better = best is None or (
                monitored < best["value"] if cfg.monitor_mode == "min" else monitored > best["value"]
            )
            if better:
                state["best"] = {
                    "metric": cfg.monitor_metric, "mode": cfg.monitor_mode, "value": monitored,
                    "step": state["step"], "epoch": epoch, "checkpoint": step_dir_name(state["step"]),
                }  # fmt: skip
        if rt.is_main:
            try:
                append_jsonl(self.config.run_dir / METRICS_FILE, row)
            except OSError as exc:  # a full disk: the checkpoint carries the row; resume rewrites the log
                self._handle_save_error(CheckpointWriteError(self.config.run_dir / METRICS_FILE,
                                                             f"metrics append failed: {exc.strerror or exc}"))  # fmt: skip
            if db is not None:
                db.log_epoch(row)

    def _save(self, manager, model, optimizer, scheduler, scaler, stream, acc, state, reason) -> None:
        cfg, rt = self.config, self.runtime
        training_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": rng_state(),
            "data": stream.state_dict(),
            # Copied now: the next step adds to them before the writer thread has taken its copy.
            "accumulators": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in acc.items()},
        }
        step = state["step"]
        epoch_done = step // cfg.steps_per_epoch
        metrics = state["metrics_history"][-1] if reason == "epoch_end" and state["metrics_history"] else {}
        trainer_state = {
            "format_version": TRAINER_STATE_VERSION,
            "run_name": cfg.run_name,
            "run_id": state["run_id"],
            "step": step,
            "epoch": epoch_done,
            "step_in_epoch": step - epoch_done * cfg.steps_per_epoch,
            "total_steps": cfg.total_steps,
            "completed": step >= cfg.total_steps,
            "reason": reason,
            "saved_at": time.time(),
            "resume_count": state["resume_count"],
            "wall_seconds": state["wall_seconds"],
            "metrics_history": state["metrics_history"],
            "best": state["best"],
            "config": cfg.to_dict(),
            "world_size": rt.world_size,
            "corpus_fingerprint": self.corpus_fingerprint,
        }
        manifest_fields = {
            "epoch": epoch_done,
            "reason": reason,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        try:
            if rt.distributed:
                manager.save(step, model=model, optimizer=optimizer, training_state=training_state,
                             trainer_state=trainer_state, manifest_fields=manifest_fields)  # fmt: skip
            elif manager is not None:
                manager.save(step, model_state=model.state_dict(), training_state=training_state,
                             trainer_state=trainer_state, manifest_fields=manifest_fields)  # fmt: skip
        except CheckpointWriteError as exc:
            self._handle_save_error(exc)


def train(config: TrainingConfig, *, resume: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Train (or continue) the run described by `config`; returns the results dict."""
    return Trainer(config, resume=resume, progress=progress).fit()
