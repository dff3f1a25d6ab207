"""Corpus -> byte tokens -> deterministic, resumable batches.

The default corpus is the Python standard library's own source: every Python install
(Colab included) has it, so nothing is downloaded. Tokens are bytes (vocabulary 256).
A batch is a pure function of (seed, rank, position): resuming at a saved position
continues the exact same stream, and each rank of a distributed job reads its own shard.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 256
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".tex", ".html", ".xml", ".yaml", ".yml"}


class CorpusError(ValueError):
    """The corpus path cannot be used; the message names the path and the fix."""


def stdlib_source_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def _corpus_files(corpus: str | None) -> list[Path]:
    if corpus is None:
        files = stdlib_source_files()
        if not files:
            raise CorpusError("no Python standard library source found; pass --corpus PATH to a text file")
        return files
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(
                f"corpus folder {path} has no text files ({', '.join(sorted(TEXT_SUFFIXES))}); "
                "point --corpus at a text file or a folder of them"
            )
        return files
    raise CorpusError(f"corpus {path} does not exist; pass a text file or a folder of text files")


def load_corpus_bytes(corpus: str | None, max_bytes: int) -> bytes:
    """Concatenate the corpus files (sorted, so the same on every run) up to max_bytes."""
    chunks: list[bytes] = []
    total = 0
    for file in _corpus_files(corpus):
        try:
            data = file.read_bytes()
        except OSError as exc:
            if corpus is None:
                continue  # an unreadable stdlib file is skipped; the rest is plenty
            raise CorpusError(f"cannot read corpus file {file}: {exc.strerror}") from exc
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return b"".join(chunks)


def _split_is_usable(n_bytes: int, val_fraction: float, context_length: int) -> bool:
    # A window is context_length + 1 bytes and sample_batch needs at least two start
    # positions; the training split gets room for two windows.
    n_val = int(n_bytes * val_fraction)
    return n_val >= context_length + 2 and n_bytes - n_val >= 2 * (context_length + 1)


def minimum_corpus_bytes(val_fraction: float, context_length: int) -> int:
    """The fewest bytes a corpus needs for this validation fraction and context length."""
    n_bytes = math.ceil(max((context_length + 2) / val_fraction, 2 * (context_length + 1) / (1 - val_fraction)))
    n_bytes = max(n_bytes - 2, 1)  # the float estimate may be a byte high or low
    while not _split_is_usable(n_bytes, val_fraction, context_length):
        n_bytes += 1
    return n_bytes


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 tokens
    val: torch.Tensor
    fingerprint: str  # hash of the bytes, stored with checkpoints to catch a changed corpus

    @classmethod
    def load(cls, corpus: str | None, *, max_bytes: int, val_fraction: float, context_length: int) -> Corpus:
        data = load_corpus_bytes(corpus, max_bytes)
        n_val = int(len(data) * val_fraction)
        if not _split_is_usable(len(data), val_fraction, context_length):
            where = corpus if corpus is not None else "the standard library"
            raise CorpusError(
                f"corpus {where} has {len(data)} bytes, too few for context_length={context_length}; "
                f"give at least {minimum_corpus_bytes(val_fraction, context_length)} bytes or a shorter context"
            )
        tokens = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        fingerprint = hashlib.sha256(data).hexdigest()[:16]
        return cls(train=tokens[: len(data) - n_val], val=tokens[len(data) - n_val :], fingerprint=fingerprint)


def _generator(seed: int, rank: int, position: int) -> torch.Generator:
    # A fresh generator per batch: batch k never depends on how batches 0..k-1 were drawn.
    mixed = hashlib.blake2b(f"{seed}:{rank}:{position}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(mixed, "little") & (2**63 - 1))


def sample_batch(
    tokens: torch.Tensor, *, batch_size: int, context_length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(len(tokens) - context_length - 1, (batch_size,), generator=generator)
    offsets = torch.arange(context_length + 1)
    window = tokens[starts[:, None] + offsets].long()  # (B, T+1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class BatchStream:
    """Training batches as a resumable stream: `position` is the number of batches drawn."""

    def __init__(self, tokens: torch.Tensor, *, batch_size: int, context_length: int, seed: int, rank: int = 0) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_length = context_length
        self.seed = seed
        self.rank = rank
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = _generator(self.seed, self.rank, self.position)
        self.position += 1
        return sample_batch(self.tokens, batch_size=self.batch_size, context_length=self.context_length, generator=gen)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data stream seed {state['seed']} does not match the config's seed {self.seed}")
        self.position = int(state["position"])


def validation_batches(
    tokens: torch.Tensor, *, count: int, batch_size: int, context_length: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same held-out batches at every evaluation, so val/loss is comparable across epochs."""
    gen = _generator(seed, -1, 0)
    return [
        sample_batch(tokens, batch_size=batch_size, context_length=context_length, generator=gen) for _ in range(count)
    ]


def token_histogram(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens.reshape(-1).long(), minlength=VOCAB_SIZE).double()


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor | list[int]) -> str:
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    return bytes(int(t) for t in values).decode("utf-8", errors="replace")
