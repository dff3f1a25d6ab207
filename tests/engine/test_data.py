"""Tests for the corpus and the batch stream: stdlib default, files and folders, determinism, resume."""

from __future__ import annotations

import socket
import sysconfig
from pathlib import Path

import pytest
import torch

from utils.training.engine.data import (
    VOCAB_SIZE,
    BatchStream,
    Corpus,
    CorpusError,
    decode,
    encode,
    load_corpus_bytes,
    minimum_corpus_bytes,
    stdlib_source_files,
    token_histogram,
    validation_batches,
)

TEXT = ("def f(x):\n    return x * 2  # héllo\n" * 400).encode("utf-8")


def _load(corpus: str | None, *, max_bytes: int = 200_000, context_length: int = 16) -> Corpus:
    return Corpus.load(corpus, max_bytes=max_bytes, val_fraction=0.1, context_length=context_length)


def test_default_corpus_is_the_stdlib_source_and_needs_no_network(monkeypatch: pytest.MonkeyPatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default corpus tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    files = stdlib_source_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 50
    assert all(f.parent == stdlib and f.suffix == ".py" for f in files)
    assert files == sorted(files)
    corpus = _load(None)
    expected = b"".join(f.read_bytes() for f in files)[:200_000]
    assert len(corpus.train) + len(corpus.val) == 200_000
    assert bytes(torch.cat([corpus.train, corpus.val]).tolist()) == expected
    assert corpus.train.dtype == torch.uint8


def test_the_same_corpus_gives_the_same_fingerprint_and_a_different_one_does_not(tmp_path: Path):
    a = tmp_path / "a.txt"
    a.write_bytes(TEXT)
    first, second = _load(str(a)), _load(str(a))
    assert first.fingerprint == second.fingerprint
    assert torch.equal(first.train, second.train)
    a.write_bytes(TEXT.replace(b"2", b"3"))
    assert _load(str(a)).fingerprint != first.fingerprint


def test_the_validation_split_is_the_tail_of_the_corpus(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_bytes(TEXT)
    corpus = _load(str(path))
    n_val = int(len(TEXT) * 0.1)
    assert bytes(corpus.val.tolist()) == TEXT[-n_val:]
    assert bytes(corpus.train.tolist()) == TEXT[:-n_val]


def test_a_corpus_file(tmp_path: Path):
    path = tmp_path / "one.txt"
    path.write_bytes(TEXT)
    assert load_corpus_bytes(str(path), 10**9) == TEXT
    assert load_corpus_bytes(str(path), 100) == TEXT[:100]


def test_a_corpus_folder_reads_its_text_files_in_sorted_order_and_skips_others(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"B" * 300)
    (tmp_path / "a.md").write_bytes(b"A" * 300)
    (tmp_path / "sub" / "c.py").write_bytes(b"C" * 300)
    (tmp_path / "image.png").write_bytes(b"\x89PNG" * 100)
    data = load_corpus_bytes(str(tmp_path), 10**9)
    assert data == b"A" * 300 + b"B" * 300 + b"C" * 300
    assert load_corpus_bytes(str(tmp_path), 450) == b"A" * 300 + b"B" * 150


def test_a_folder_without_text_files_names_the_folder(tmp_path: Path):
    (tmp_path / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(CorpusError, match=str(tmp_path)):
        _load(str(tmp_path))


def test_a_missing_corpus_names_the_path(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=f"{missing} does not exist"):
        _load(str(missing))


def test_too_small_a_corpus_names_the_path_and_a_size_that_works(tmp_path: Path):
    path = tmp_path / "small.txt"
    path.write_bytes(b"x" * 100)
    with pytest.raises(CorpusError) as info:
        Corpus.load(str(path), max_bytes=10**6, val_fraction=0.1, context_length=64)
    message = str(info.value)
    assert str(path) in message and "100 bytes" in message and "context_length=64" in message
    advised = int(message.split("give at least ")[1].split()[0])
    assert advised == minimum_corpus_bytes(0.1, 64)
    # The advice is right: that many bytes load and every batch can be drawn; one byte fewer is refused.
    path.write_bytes(b"x" * advised)
    corpus = Corpus.load(str(path), max_bytes=10**6, val_fraction=0.1, context_length=64)
    validation_batches(corpus.val, count=2, batch_size=2, context_length=64, seed=0)
    BatchStream(corpus.train, batch_size=2, context_length=64, seed=0).next_batch()
    path.write_bytes(b"x" * (advised - 1))
    with pytest.raises(CorpusError):
        Corpus.load(str(path), max_bytes=10**6, val_fraction=0.1, context_length=64)


def test_an_empty_corpus_file_is_refused_with_its_path(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(CorpusError, match=str(path)):
        _load(str(path))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.arange(5000, dtype=torch.int64).remainder(VOCAB_SIZE).to(torch.uint8)


def test_batches_are_shifted_windows_of_the_corpus(tokens: torch.Tensor):
    stream = BatchStream(tokens, batch_size=4, context_length=16, seed=1)
    x, y = stream.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # tokens are position mod 256, so each row counts up by one
    assert torch.equal((x[:, 1:] - x[:, :-1]) % VOCAB_SIZE, torch.ones(4, 15, dtype=torch.long))


def test_the_stream_is_deterministic(tokens: torch.Tensor):
    a = BatchStream(tokens, batch_size=4, context_length=16, seed=7)
    b = BatchStream(tokens, batch_size=4, context_length=16, seed=7)
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.position == 5


def test_the_stream_does_not_depend_on_the_global_rng(tokens: torch.Tensor):
    a = BatchStream(tokens, batch_size=4, context_length=16, seed=7)
    torch.manual_seed(0)
    first = a.next_batch()[0]
    b = BatchStream(tokens, batch_size=4, context_length=16, seed=7)
    torch.manual_seed(12345)
    torch.rand(100)
    assert torch.equal(b.next_batch()[0], first)


def test_seed_and_rank_change_the_stream(tokens: torch.Tensor):
    base = BatchStream(tokens, batch_size=4, context_length=16, seed=7).next_batch()[0]
    other_seed = BatchStream(tokens, batch_size=4, context_length=16, seed=8).next_batch()[0]
    other_rank = BatchStream(tokens, batch_size=4, context_length=16, seed=7, rank=1).next_batch()[0]
    assert not torch.equal(base, other_seed)
    assert not torch.equal(base, other_rank)


def test_a_stream_resumed_from_its_saved_state_continues_the_same_batches(tokens: torch.Tensor):
    full = BatchStream(tokens, batch_size=4, context_length=16, seed=3)
    reference = [full.next_batch() for _ in range(8)]
    first = BatchStream(tokens, batch_size=4, context_length=16, seed=3)
    for _ in range(3):
        first.next_batch()
    saved = first.state_dict()
    assert saved == {"position": 3, "seed": 3}
    resumed = BatchStream(tokens, batch_size=4, context_length=16, seed=3)
    resumed.load_state_dict(saved)
    for expected_x, expected_y in reference[3:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    assert resumed.position == 8


def test_a_stream_refuses_the_state_of_another_seed(tokens: torch.Tensor):
    stream = BatchStream(tokens, batch_size=4, context_length=16, seed=3)
    with pytest.raises(ValueError, match="seed"):
        stream.load_state_dict({"position": 2, "seed": 4})
    assert stream.position == 0


def test_validation_batches_are_fixed_and_independent_of_training(tokens: torch.Tensor):
    first = validation_batches(tokens, count=3, batch_size=4, context_length=16, seed=5)
    stream = BatchStream(tokens, batch_size=4, context_length=16, seed=5)
    for _ in range(4):
        stream.next_batch()
    torch.manual_seed(99)
    second = validation_batches(tokens, count=3, batch_size=4, context_length=16, seed=5)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])  # distinct batches, not one repeated
    assert not torch.equal(first[0][0], BatchStream(tokens, batch_size=4, context_length=16, seed=5).next_batch()[0])


def test_token_histogram_counts_bytes():
    hist = token_histogram(torch.tensor([0, 1, 1, 255], dtype=torch.uint8))
    assert hist.shape == (VOCAB_SIZE,)
    assert hist[0] == 1 and hist[1] == 2 and hist[255] == 1 and hist.sum() == 4


def test_encode_decode_round_trip():
    text = "print('héllo')\n"
    tokens = encode(text)
    assert tokens.dtype == torch.long and len(tokens) == len(text.encode("utf-8"))
    assert decode(tokens) == text
    assert decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 is replaced, not raised
