"""Loop benchmarks: the engine's training loop against a hand-written one, and the cost of async checkpoints.

Both sides train the same model on the same batches with the same threads. The runs of a round
train in lockstep (`Lockstep`): one at a time, each handing a baton to the next after every step,
so that they see the same machine load. Time is taken from one clock on every side: a
global forward pre-hook stamps every forward of the model. Training throughput sums the gaps
between consecutive training forwards (one full step each: data, forward, backward, clip,
optimizer, bookkeeping, and any checkpoint stall), less the time spent waiting for the baton;
gaps that contain an evaluation forward (epoch ends: eval, drift, epoch-end save) are left out
on both sides. Whole-run wall time (set-up and eval included) is reported beside it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from utils.training.config import TrainingConfig
from utils.training.engine.checkpoint import SAVE_THREAD_PREFIX
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


class Lockstep:
    """Training loops run in threads, one at a time, in lockstep: after each training step the running
    loop hands a baton to the next, so that the loops of a round train side by side, step by step,
    under the same load. (Whole runs one after the other sit seconds apart, and on a shared machine a
    loop's own speed drifts within a second by more than the figure being measured.)

    The baton passes in a global forward pre-hook of the byte LM, at the start of a training forward.
    A loop's time is measured from its own forwards (one stamp per forward; a gap between two training
    forwards is one full step: data, forward, backward, clip, optimizer, bookkeeping, any checkpoint
    stall) less the time it waited for the baton. A loop whose checkpoint threads still run keeps the
    baton until they end (`deferred_passes` counts those steps): a save's background work overlaps only
    the saving loop's own steps, as in a real run, and the slowdown it causes is charged to that loop.
    Each loop sets up while holding the baton, so its set-up never overlaps another loop's steps."""

    def run(self, loops: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
        """Run every loop to its end, the first one first; per loop: train_seconds, steps,
        median_step_seconds, wall_seconds (set-up and evaluation included, baton waits excluded) and
        deferred_passes."""
        names = list(loops)
        self._order = names
        self._batons = {name: threading.Semaphore(0) for name in names}
        self._running = set(names)
        self._guard = threading.Lock()
        self._stamps: dict[str, list[tuple[float, bool, float]]] = {name: [] for name in names}
        self._trained = dict.fromkeys(names, False)
        self._paused = dict.fromkeys(names, 0.0)
        self._deferred = dict.fromkeys(names, 0)
        self._loop_of: dict[int, str] = {}
        walls: dict[str, float] = {}
        errors: list[BaseException] = []

        def body(name: str) -> None:
            self._loop_of[threading.get_ident()] = name
            self._batons[name].acquire()
            start = time.perf_counter()
            try:
                loops[name]()
            except BaseException as exc:  # raised in the calling thread once every loop has ended
                errors.append(exc)
            finally:
                walls[name] = time.perf_counter() - start - self._paused[name]
                with self._guard:
                    self._running.discard(name)
                    following = self._following(name)
                if following is not None:
                    self._batons[following].release()

        handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        try:
            threads = [threading.Thread(target=body, args=(name,), name=f"lockstep-{name}") for name in names]
            for thread in threads:
                thread.start()
            self._batons[names[0]].release()
            for thread in threads:
                thread.join()
        finally:
            handle.remove()
        if errors:
            raise errors[0]
        results = {}
        for name in names:
            gaps = self.step_gaps(name)
            results[name] = {
                "train_seconds": sum(gaps), "steps": len(gaps), "median_step_seconds": median(gaps),
                "wall_seconds": walls[name], "deferred_passes": self._deferred[name],
            }  # fmt: skip
        return results

    def step_gaps(self, name: str) -> list[float]:
        """One full training step each: the gaps between consecutive training forwards of loop `name`
        in the last run, less the time it waited for the baton in between."""
        stamps = self._stamps[name]
        pairs = zip(stamps, stamps[1:], strict=False)
        return [(t1 - t0) - (p1 - p0) for (t0, train0, p0), (t1, train1, p1) in pairs if train0 and train1]

    def _following(self, name: str) -> str | None:
        """The next loop after `name` in the cycle that is still running, or None."""
        i = self._order.index(name)
        for other in self._order[i + 1 :] + self._order[:i]:
            if other in self._running:
                return other
        return None

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        name = self._loop_of.get(threading.get_ident())
        if name is None or not isinstance(module, ByteTransformer):
            return
        if module.training:
            if self._trained[name]:
                self._hand_on(name)
            self._trained[name] = True
        self._stamps[name].append((time.perf_counter(), module.training, self._paused[name]))

    def _hand_on(self, name: str) -> None:
        """Hand the baton to the next loop and wait for it to come back; kept while a checkpoint
        thread runs (only the loop holding the baton can have one)."""
        if any(t.name.startswith(SAVE_THREAD_PREFIX) for t in threading.enumerate()):
            self._deferred[name] += 1
            return
        with self._guard:
            following = self._following(name)
        if following is None:
            return
        handed = time.perf_counter()
        self._batons[following].release()
        self._batons[name].acquire()
        self._paused[name] += time.perf_counter() - handed


def loop_config(workspace: Path, run_name: str, steps_per_epoch: int, epochs: int, every: int) -> TrainingConfig:
    return TrainingConfig.from_preset(
        "tiny", workspace_root=str(workspace), run_name=run_name, epochs=epochs, steps_per_epoch=steps_per_epoch,
        save_every_steps=every, save_every_seconds=0, keep_last=1, device="cpu",
    )  # fmt: skip


def engine_run(config: TrainingConfig) -> None:
    Trainer(config, resume="never", progress=False).fit()


def plain_run(config: TrainingConfig, adamw_flags: dict[str, Any]) -> None:
    """A hand-written loop, as nanoGPT would write it, doing the same work as the engine: same corpus,
    batches, model, loss, AdamW groups and flags (foreach/fused as the engine's), warmup + cosine
    schedule, clipping, a flushed JSON log line of mean loss, grad norm and learning rate every
    log_every_steps (the engine's steps.jsonl), per-epoch evaluation."""
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
                val_loss = sum(float(F.cross_entropy(model(vx).view(-1, 256), vy.view(-1))) for vx, vy in val_batches)
            del val_loss
            model.train()
    log.close()


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
    # engine_again: the engine run once more, the same as `engine`; the pair's spread is the measurement's own.
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "engine": [], "engine_ckpt": [], "engine_again": []}
    kinds = list(runs)
    lockstep = Lockstep()
    for r in range(repeats):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]  # who starts rotates; who follows whom flips
        loops: dict[str, Callable[[], object]] = {}
        for kind in order[::-1] if r % 2 else order:
            every = checkpoint_every if kind == "engine_ckpt" else 0
            config = loop_config(workdir / f"{kind}-{r}", kind, steps_per_epoch, epochs, every)
            loops[kind] = partial(plain_run, config, flags) if kind == "plain" else partial(engine_run, config)
        for kind, run in lockstep.run(loops).items():
            runs[kind].append(run)
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

    plain, engine, ckpt, again = samples("plain"), samples("engine"), samples("engine_ckpt"), samples("engine_again")
    null = [1 - a / e for a, e in zip(again, engine, strict=True)]
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
            "and the epoch-end save excluded on both sides: see benchmarks/loop.py), the runs of a round trained "
            "in lockstep, one step each in turn (Lockstep in benchmarks/loop.py); engine = "
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
            deferred_passes=med("engine_ckpt", "deferred_passes"),
            null_overhead=median(null),
            null_overhead_min=min(null),
            null_overhead_max=max(null),
            **common,
            method="per round: 1 - engine tokens/s with async checkpoints every N steps / engine tokens/s without, "
            "both runs (with the plain loop and a second run without checkpoints) trained in lockstep, one step "
            "each in turn (Lockstep in benchmarks/loop.py); the steps that carry a save (stall, waiting for the "
            "previous save) are timed, and a run whose checkpoint threads still run keeps the baton until they "
            "end (deferred_passes), so their CPU and GIL use slow only its own steps; null_overhead: the same "
            "figure between the two runs without checkpoints, the measurement's own spread; median of >= 5 "
            "rounds in the quick and full suites",
        ),  # fmt: skip
    }
