"""Corpus -> byte tokens -> deterministic, resumable batches.

The default corpus is the Python standard library's own source: every Python install
(Colab included) has it, so nothing is downloaded. Tokens are bytes (vocabulary 256).
A batch is a pure function of (seed, rank, position): resuming at a saved position
continues the exact same stream, and each rank of a distributed job reads its own shard.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
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


SNIFF_BYTES = 8192  # how much of a file is looked at to tell text from binary
SNAPSHOT_FILE = "corpus.snapshot"  # the default corpus as this run first read it (DESIGN.md)


def _check_text_file(path: Path, *, named: bool) -> bool:
    """A regular text file: True. A binary file: False when found inside a folder, an error
    when the user named it. Devices, FIFOs and sockets are always errors (reading one would
    block or never end)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {path}: {exc.strerror}; check the path") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
        raise CorpusError(f"corpus {path} is {kind}, not a text file; point the corpus at a text file or folder")
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from exc
    binary = b"\x00" in head
    if not binary:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            binary = exc.start < len(head) - 4  # a character cut at the end of the sample is fine
    if binary and named:
        raise CorpusError(f"corpus {path} is a binary file, not UTF-8 text; point the corpus at a text file")
    return not binary


def _corpus_files(corpus: str | None) -> list[Path]:
    if corpus is None:
        files = stdlib_source_files()
        if not files:
            raise CorpusError("no Python standard library source found; set corpus to a text file")
        return files
    if not isinstance(corpus, str) or not corpus.strip():
        raise CorpusError(f"corpus {corpus!r} is empty; leave it unset for the default, or give a text file")
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        files = [p for p in files if _check_text_file(p, named=False)]
        if not files:
            raise CorpusError(
                f"corpus folder {path} has no text files ({', '.join(sorted(TEXT_SUFFIXES))}); "
                "set corpus to a text file or a folder of them"
            )
        return files
    if os.path.lexists(path):
        _check_text_file(path, named=True)
        return [path]
    raise CorpusError(f"corpus {path} does not exist; pass a text file or a folder of text files")


def load_corpus_bytes(corpus: str | None, max_bytes: int) -> bytes:
    """Concatenate the corpus files (sorted, so the same on every run) up to max_bytes. No
    more than max_bytes is ever read, so memory stays bounded whatever the files' sizes."""
    out = bytearray()
    for file in _corpus_files(corpus):
        try:
            with open(file, "rb") as f:
                out += f.read(max_bytes - len(out))
        except OSError as exc:
            if corpus is None:
                continue  # an unreadable stdlib file is skipped; the rest is plenty
            raise CorpusError(f"cannot read corpus file {file}: {exc.strerror}") from exc
        if len(out) >= max_bytes:
            break
    return bytes(out)


def load_run_corpus(corpus: str | None, max_bytes: int, run_dir: Path, *, write_snapshot: bool = True) -> bytes:
    """The corpus bytes of a run. The default corpus (Python's standard library) is read once
    and snapshotted into `<run>/corpus.snapshot` (fsynced, renamed into place), and every
    later start of the run reads the snapshot, so a Python upgrade never changes a run's
    data. A given corpus path is read as it is (a changed one is caught by the resume's
    data fingerprint check)."""
    if corpus is not None:
        return load_corpus_bytes(corpus, max_bytes)
    snapshot = Path(run_dir) / SNAPSHOT_FILE
    if snapshot.is_file():
        with open(snapshot, "rb") as f:
            return f.read(max_bytes)
    data = load_corpus_bytes(None, max_bytes)
    if write_snapshot:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        tmp = snapshot.with_name(f".{SNAPSHOT_FILE}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, snapshot)
    return data


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
    def load(
        cls,
        corpus: str | None,
        *,
        max_bytes: int,
        val_fraction: float,
        context_length: int,
        run_dir: Path | None = None,
        write_snapshot: bool = True,
    ) -> Corpus:
        """With `run_dir`, the default corpus comes from (or is saved to) the run's snapshot."""
        if run_dir is not None:
            data = load_run_corpus(corpus, max_bytes, run_dir, write_snapshot=write_snapshot)
        else:
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
