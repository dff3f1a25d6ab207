"""The built-in example as a Task: a byte-level transformer LM over a text corpus (by default
Python's own standard library source). `build_task` is the default builder of `train`:
"utils.training.engine.lm_task:build_task"."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..config import TrainingConfig
from .data import VOCAB_SIZE, BatchStream, Corpus, decode, encode, token_histogram, validation_batches
from .model import ByteTransformer, parameter_group
from .task import LanguageModel, Task

TASK_PATH = "utils.training.engine.lm_task:build_task"
PROBE_ROWS = 4  # rows of the first validation batch used as the drift probe


def _rank() -> int:
    return (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-byte cross-entropy of a (inputs, targets) batch."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def sample(model: torch.nn.Module, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 40, seed: int | None = None) -> str:  # fmt: skip
    """Continue `prompt` with the model (what the notebook's Inference cell calls)."""
    device = next(model.parameters()).device
    ids = encode(prompt or "\n").unsqueeze(0).to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    finally:
        model.train(was_training)
    return decode(out[0, ids.shape[1] :])


def validation_count(config: TrainingConfig, val_tokens: torch.Tensor) -> int:
    """eval_batches, or with 0 as many batches as the validation split holds windows for."""
    if config.eval_batches:
        return config.eval_batches
    return max(1, len(val_tokens) // (config.batch_size * (config.context_length + 1)))


def build_task(config: TrainingConfig) -> Task:
    """The byte LM: ByteTransformer sized by the config, the corpus split, a seeded batch stream."""
    corpus = Corpus.load(
        config.corpus,
        max_bytes=config.corpus_max_bytes,
        val_fraction=config.val_fraction,
        context_length=config.context_length,
    )
    model = ByteTransformer.from_config(config)
    stream = BatchStream(corpus.train, batch_size=config.batch_size, context_length=config.context_length,
                         seed=config.seed, rank=_rank())  # fmt: skip
    val = validation_batches(corpus.val, count=validation_count(config, corpus.val), batch_size=config.batch_size,
                             context_length=config.context_length, seed=config.seed)  # fmt: skip
    return Task(
        model=model,
        train_data=stream,
        val_data=val,
        loss_fn=lm_loss,
        sample_fn=sample,
        batched=True,
        language_model=LanguageModel(
            vocab_size=VOCAB_SIZE,
            inputs=_inputs,
            logits=_logits,
            val_token_counts=token_histogram(corpus.val),
            probe=val[0][0][: min(PROBE_ROWS, config.batch_size)],
        ),
        parameter_group=parameter_group,
        data_fingerprint=corpus.fingerprint,
    )


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)
