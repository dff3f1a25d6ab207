"""A Hugging Face `transformers` causal LM (GPT-2 architecture) built from a tiny config, trained
through the Task API on byte ids: no tokenizer, no hub access. The best checkpoint exports with
`save_pretrained` (see `export_pretrained`).

    python -m utils.training train --task examples.hf_causal_lm:build_task --epochs 2 --steps-per-epoch 50

Needs transformers (`pip install .[examples]`). task_options: `n_embd` (default 64), `n_layer`
(default 2), `n_head` (default 2), `windows` (training windows, default all the corpus holds).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from utils.training import Task, TrainingConfig
from utils.training.engine.checkpoint import read_model_file
from utils.training.engine.data import VOCAB_SIZE, Corpus, decode, encode, token_histogram
from utils.training.engine.task import LanguageModel


class ByteWindows(Dataset):
    """Non-overlapping windows of byte ids: item i is {"input_ids": window i} (labels = inputs;
    the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, context_length: int, limit: int | None = None) -> None:
        count = len(tokens) // context_length
        self.windows = tokens[: count * context_length].long().view(count, context_length)[:limit]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index]}


def make_model(config: TrainingConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    options = config.task_options
    model_config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=config.context_length,
        n_embd=int(options.get("n_embd", 64)),
        n_layer=int(options.get("n_layer", 2)),
        n_head=int(options.get("n_head", 2)),
        bos_token_id=ord("\n"),
        eos_token_id=ord("\n"),
    )
    return GPT2LMHeadModel(model_config)


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def sample(
    model: torch.nn.Module, prompt: str, *, max_new_tokens: int = 100, seed: int | None = None, **_: object
) -> str:
    """Continue `prompt` byte by byte (multinomial sampling)."""
    device = next(model.parameters()).device
    ids = encode(prompt or "\n").unsqueeze(0).to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    start, window = ids.shape[1], model.config.n_positions
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            probs = torch.softmax(_logits(model, ids[:, -window:])[:, -1, :].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return decode(ids[0, start:])


def build_task(config: TrainingConfig) -> Task:
    corpus = Corpus.load(config.corpus, max_bytes=config.corpus_max_bytes, val_fraction=config.val_fraction,
                         context_length=config.context_length)  # fmt: skip
    limit = config.task_options.get("windows")
    train = ByteWindows(corpus.train, config.context_length, int(limit) if limit else None)
    val = ByteWindows(corpus.val, config.context_length)
    return Task(
        model=make_model(config),
        train_data=train,
        val_data=val,
        loss_fn=loss_fn,
        sample_fn=sample,
        language_model=LanguageModel(
            vocab_size=VOCAB_SIZE,
            inputs=lambda batch: batch["input_ids"],
            logits=_logits,
            val_token_counts=token_histogram(corpus.val),
            probe=val.windows[:2],
        ),
        data_fingerprint=corpus.fingerprint,
    )


def export_pretrained(checkpoint: str | Path, output_dir: str | Path, config: TrainingConfig) -> Path:
    """Write a checkpoint's weights as a Hugging Face model folder (config.json + safetensors),
    loadable with `GPT2LMHeadModel.from_pretrained(output_dir)`."""
    model = make_model(config)
    model.load_state_dict(read_model_file(Path(checkpoint) / "model.safetensors"))
    model.save_pretrained(output_dir)
    return Path(output_dir)
