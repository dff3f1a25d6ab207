"""Loop benchmarks: the engine's training loop against a hand-written one, and the cost of async checkpoints.

Both sides train the same model on the same batches with the same threads. Time is taken
from one clock on both sides: a global forward pre-hook stamps every forward of the model.
Training throughput sums the gaps between consecutive training forwards (one full step each:
data, forward, backward, clip, optimizer, bookkeeping, and any checkpoint stall); gaps that
contain an evaluation forward (epoch ends: eval, drift, epoch-end save) are left out on both
sides. Whole-run wall time (set-up and eval included) is reported beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from utils.training.config import TrainingConfig
from utils.training.engine.data import BatchStream, Corpus, validation_batches
from utils.training.engine.model import ByteTransformer
from utils.training.engine.trainer import Trainer, lr_multiplier

from .common import entry, median

ADAMW_FLAGS = ("foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad")


class OptimizerFlags:
    """The flags of the first optimizer that steps while active (a global step pre-hook): read
    from the engine's own AdamW so that the plain loop is built with the very same ones."""

    def __enter__(self) -> OptimizerFlags:
        self.flags: dict[str, Any] | None = None
        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.flags is None:
            self.flags = {"type": type(optimizer).__name__, **{k: optimizer.defaults.get(k) for k in ADAMW_FLAGS}}

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class ForwardClock:
    """Stamps (time, training?) at every ByteTransformer forward while active."""

    def __enter__(self) -> ForwardClock:
        self.stamps: list[tuple[float, bool]] = []
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        if isinstance(module, ByteTransformer):
            self.stamps.append((time.perf_counter(), module.training))

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def step_gaps(self) -> list[float]:
        """The gaps between consecutive training forwards: one full training step each."""
        pairs = zip(self.stamps, self.stamps[1:], strict=False)
        return [t1 - t0 for (t0, train0), (t1, train1) in pairs if train0 and train1]


def loop_config(workspace: Path, run_name: str, steps_per_epoch: int, epochs: int, every: int) -> TrainingConfig:
    return TrainingConfig.from_preset(
        "tiny", workspace_root=str(workspace), run_name=run_name, epochs=epochs, steps_per_epoch=steps_per_epoch,
        save_every_steps=every, save_every_seconds=0, keep_last=1, device="cpu",
    )  # fmt: skip


def engine_run(config: TrainingConfig) -> dict[str, float]:
    with ForwardClock() as clock:
        start = time.perf_counter()
        Trainer(config, resume="never", progress=False).fit()
        wall = time.perf_counter() - start
    gaps = clock.step_gaps()
    return {"train_seconds": sum(gaps), "steps": len(gaps), "median_step_seconds": median(gaps), "wall_seconds": wall}


def plain_run(config: TrainingConfig, adamw_flags: dict[str, Any]) -> dict[str, float]:
    """A hand-written loop, as nanoGPT would write it, doing the same work as the engine: same corpus,
    batches, model, loss, AdamW groups and flags (foreach/fused as the engine's), warmup + cosine
    schedule, clipping, a flushed JSON log line of mean loss, grad norm and learning rate every
    log_every_steps (the engine's steps.jsonl), per-epoch evaluation."""
    with ForwardClock() as clock:
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        corpus = Corpus.load(
            config.corpus, max_bytes=config.corpus_max_bytes, val_fraction=config.val_fraction,
            context_length=config.context_length,
        )  # fmt: skip
        model = ByteTransformer.from_config(config)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate, betas=(config.beta1, config.beta2),
            **{k: v for k, v in adamw_flags.items() if k in ADAMW_FLAGS},
        )  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(
                s, warmup_steps=config.warmup_steps, total_steps=config.total_steps, min_lr_ratio=config.min_lr_ratio
            ),
        )
        stream = BatchStream(
            corpus.train, batch_size=config.batch_size, context_length=config.context_length, seed=config.seed
        )
        val_batches = validation_batches(
            corpus.val, count=config.eval_batches, batch_size=config.batch_size,
            context_length=config.context_length, seed=config.seed,
        )  # fmt: skip
        model.train()
        Path(config.workspace_root).mkdir(parents=True, exist_ok=True)
        log = open(Path(config.workspace_root) / "plain-steps.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        loss_sum, norm_sum = torch.zeros(()), torch.zeros(())
        for step in range(config.total_steps):
            x, y = stream.next_batch()
            logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_sum += loss.detach()
            norm_sum += norm
            if config.log_every_steps and (step + 1) % config.log_every_steps == 0:  # the engine's steps.jsonl line
                n = config.log_every_steps
                row = {"step": step + 1, "train/loss": float(loss_sum) / n, "grad_norm": float(norm_sum) / n,
                       "learning_rate": scheduler.get_last_lr()[0], "time": time.time()}  # fmt: skip
                log.write(json.dumps(row, sort_keys=True) + "\n")
                log.flush()
                loss_sum.zero_()
                norm_sum.zero_()
            if (step + 1) % config.steps_per_epoch == 0:
                model.eval()
                with torch.no_grad():
                    val_loss = sum(
                        float(F.cross_entropy(model(vx).view(-1, 256), vy.view(-1))) for vx, vy in val_batches
                    )
                del val_loss
                model.train()
        log.close()
        wall = time.perf_counter() - start
    gaps = clock.step_gaps()
    return {"train_seconds": sum(gaps), "steps": len(gaps), "median_step_seconds": median(gaps), "wall_seconds": wall}


def bench_loop(
    workdir: Path, steps_per_epoch: int, epochs: int, repeats: int, checkpoint_every: int
) -> dict[str, dict[str, Any]]:
    """loop_vs_plain and checkpoint_overhead, three kinds of run interleaved in rotating order;
    one paired ratio per round."""
    probe = loop_config(workdir / "probe", "probe", 1, 1, 0)
    tokens_per_step = probe.batch_size * probe.context_length
    with OptimizerFlags() as engine_flags:  # warm-up: imports, corpus in the page cache, the engine's flags
        engine_run(loop_config(workdir / "warmup-engine", "warmup", 2, 1, 0))
    flags = engine_flags.flags or {}
    with OptimizerFlags() as plain_flags:
        plain_run(loop_config(workdir / "warmup", "warmup", 2, 1, 0), flags)
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "engine": [], "engine_ckpt": []}
    kinds = list(runs)
    for r in range(repeats):
        for kind in kinds[r % 3 :] + kinds[: r % 3]:
            every = checkpoint_every if kind == "engine_ckpt" else 0
            config = loop_config(workdir / f"{kind}-{r}", kind, steps_per_epoch, epochs, every)
            runs[kind].append(plain_run(config, flags) if kind == "plain" else engine_run(config))
    total_steps = steps_per_epoch * epochs
    saves = sum(1 for s in range(1, total_steps + 1) if s % checkpoint_every == 0 and s % steps_per_epoch != 0)
    return _loop_entries(runs, tokens_per_step, total_steps, saves, checkpoint_every, repeats, flags, plain_flags.flags)


def _loop_entries(
    runs: dict[str, list[dict[str, float]]],
    tokens_per_step: int,
    total_steps: int,
    saves: int,
    checkpoint_every: int,
    repeats: int,
    engine_flags: dict[str, Any],
    plain_flags: dict[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    def samples(kind: str) -> list[float]:
        return [run["steps"] * tokens_per_step / run["train_seconds"] for run in runs[kind]]

    def med(kind: str, field: str) -> float:
        return median(run[field] for run in runs[kind])

    plain, engine, ckpt = samples("plain"), samples("engine"), samples("engine_ckpt")
    common = {"preset": "tiny", "threads": torch.get_num_threads(), "steps": total_steps, "repeats": repeats}
    lost = [
        (total_steps * tokens_per_step) * (1 / c - 1 / e) / max(saves, 1) for c, e in zip(ckpt, engine, strict=True)
    ]
    return {
        "loop_vs_plain": entry(
            [e / p for e, p in zip(engine, plain, strict=True)],
            ">=",
            0.95,
            physical_limit=1.0,
            engine_tokens_per_second=median(engine),
            plain_tokens_per_second=median(plain),
            median_step_ratio=med("plain", "median_step_seconds") / med("engine", "median_step_seconds"),
            whole_run_ratio=med("plain", "wall_seconds") / med("engine", "wall_seconds"),
            engine_wall_seconds=med("engine", "wall_seconds"),
            plain_wall_seconds=med("plain", "wall_seconds"),
            engine_samples=engine,
            plain_samples=plain,
            engine_adamw_flags=engine_flags,
            plain_adamw_flags=plain_flags,
            **common,
            method="per round: engine tokens/s / plain tokens/s over training steps only (set-up, evaluation "
            "and the epoch-end save excluded on both sides: see benchmarks/loop.py); engine = "
            "Trainer(save_every_steps=0, save_every_seconds=0, progress=False) over the byte LM Task "
            "(lm_task.build_task), which still saves at each epoch end; both sides write a flushed log line of "
            "mean loss, grad norm and learning rate every log_every_steps; the plain loop's AdamW is built with the flags read from the engine's own optimizer "
            "(engine_adamw_flags, plain_adamw_flags); whole_run_ratio = plain wall / engine wall with set-up, "
            "evaluation and saves included",
        ),  # fmt: skip
        "checkpoint_overhead": entry(
            [1 - c / e for c, e in zip(ckpt, engine, strict=True)],
            "<=",
            0.03,
            with_checkpoints_tokens_per_second=median(ckpt),
            with_checkpoints_samples=ckpt,
            without_tokens_per_second=median(engine),
            checkpoint_every_steps=checkpoint_every,
            checkpoints_in_timed_steps=saves,
            seconds_lost_per_save=median(lost),  # the scale-free figure: loop seconds lost per save
            median_step_seconds_without=med("engine", "median_step_seconds"),
            **common,
            method="per round: 1 - engine tokens/s with async checkpoints every N steps / engine tokens/s without "
            "(the same round); the steps that carry a save (stall, waiting for the previous save, the writer "
            "thread's CPU) are timed; median of >= 5 interleaved rounds in the quick and full suites",
        ),  # fmt: skip
    }
