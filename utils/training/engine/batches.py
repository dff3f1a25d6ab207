"""Data position: a task's datasets as resumable batch streams for the loop.

- A map-style dataset is shuffled by `ResumableBatchSampler`: the order of epoch e is a seeded
  permutation of (seed, e, pass), sharded per rank, and the position is (epoch, batches
  consumed), counted where the loop takes a batch (not where DataLoader workers prefetch).
  A resume rebuilds the DataLoader from that position: exact, with or without workers, and no
  dependency beyond torch (torchdata's StatefulDataLoader would checkpoint the workers' own
  iterators; ours only has to know which indices come next).
- An iterable dataset with `state_dict`/`load_state_dict` is read in this process and its own
  state goes into the checkpoint: exact.
- Any other iterable is re-read from the start of the epoch on a resume, skipping the batches
  already trained on (exact only if it yields the same order every pass); one warning says so.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from .task import Task, TaskError

log = logging.getLogger("utils.training.events")


def is_map_style(data: Any) -> bool:
    return (
        not isinstance(data, IterableDataset)
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (str, bytes))
    )


def is_stateful(data: Any) -> bool:
    return callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))


def _seed_for(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ResumableBatchSampler:
    """Index batches of one epoch, from `start` on: seeded, sharded per rank, resumable.

    Each pass over the data is a permutation seeded by (seed, epoch, pass); the rank takes every
    world_size-th index (padded by wrapping, so every rank has as many batches). An epoch is
    `steps` batches: one pass by default, more passes when steps asks for more."""

    def __init__(self, length: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:  # fmt: skip
        self.length = length
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = -(-length // world_size)
        self.batches_per_pass = self.per_rank // batch_size if drop_last else -(-self.per_rank // batch_size)
        if self.batches_per_pass == 0:
            raise TaskError(f"the training data has {length} samples, fewer than one batch of {batch_size} per process")
        self.epoch = 0
        self.start = 0
        self.steps = self.batches_per_pass

    def _pass_batches(self, epoch: int, pass_index: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(_seed_for(self.seed, epoch, pass_index))
        order = torch.randperm(self.length, generator=gen).tolist()
        padded = (order * (-(-self.per_rank * self.world_size // max(len(order), 1))))[
            : self.per_rank * self.world_size
        ]
        mine = padded[self.rank :: self.world_size]
        batches = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        return batches[: self.batches_per_pass]  # without the short last batch when drop_last

    def __iter__(self) -> Iterator[list[int]]:
        first_pass, offset = divmod(self.start, self.batches_per_pass)
        produced = self.start
        for pass_index in itertools.count(first_pass):
            for batch in self._pass_batches(self.epoch, pass_index)[offset:]:
                if produced >= self.steps:
                    return
                produced += 1
                yield batch
            offset = 0

    def __len__(self) -> int:
        return self.steps - self.start


class TrainBatches:
    """The training data as the loop sees it: `next_batch()` and a `state_dict()` of the position."""

    def __init__(self, task: Task, *, batch_size: int, seed: int, rank: int, world_size: int, pin: bool) -> None:
        self.task = task
        self.data = task.train_data
        self.batch_size = batch_size
        self.collate = task.collate_fn or default_collate
        self.map_style = is_map_style(self.data) and not task.batched
        self.stateful = is_stateful(self.data)
        self.epoch = 0  # 0-based epoch of the batches being read
        self.consumed = 0  # batches of that epoch the loop has taken
        self.steps_per_epoch = 0
        self._iter: Iterator[Any] | None = None
        self._replay = 0
        if self.map_style:
            self.sampler = ResumableBatchSampler(
                len(self.data), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                drop_last=task.drop_last,
            )  # fmt: skip
            self._loader_generator = torch.Generator()
            self._pin = pin
        elif not self.stateful:
            log.warning(
                "the training data is an iterable without state_dict/load_state_dict: a mid-epoch resume "
                "re-reads the epoch from its start and skips the batches already trained on"
            )

    def full_pass_steps(self) -> int | None:
        """Batches in one pass over the data (per rank), or None when the data has no length."""
        if self.map_style:
            return self.sampler.batches_per_pass
        try:
            n = len(self.data)
        except TypeError:
            return None
        return n if self.task.batched else -(-n // self.batch_size)

    def set_steps_per_epoch(self, steps: int) -> None:
        self.steps_per_epoch = steps

    def next_batch(self) -> Any:
        if self.consumed >= self.steps_per_epoch:
            self.epoch += 1
            self.consumed = 0
            self._iter = None
        if self._iter is None:
            self._iter = self._open()
        while True:
            try:
                batch = next(self._iter)
            except StopIteration:
                if self.map_style:
                    raise
                self._iter = self._open()  # an iterable that ended: its next pass
                continue
            if self._replay:
                self._replay -= 1
                continue
            self.consumed += 1
            return batch

    def _open(self) -> Iterator[Any]:
        if self.map_style:
            self.sampler.epoch, self.sampler.start, self.sampler.steps = self.epoch, self.consumed, self.steps_per_epoch
            self._loader_generator.manual_seed(_seed_for(self.sampler.seed, self.epoch, -1))
            loader = DataLoader(
                self.data,
                batch_sampler=self.sampler,
                collate_fn=self.collate,
                num_workers=self.task.num_workers,
                pin_memory=self._pin,
                generator=self._loader_generator,  # never draws from the global RNG
            )
            return iter(loader)
        if self.task.batched:
            return _endless(self.data) if self.stateful else iter(self.data)
        return self._collated(iter(self.data))

    def _collated(self, items: Iterator[Any]) -> Iterator[Any]:
        while True:
            chunk = list(itertools.islice(items, self.batch_size))
            if not chunk:
                return
            yield self.collate(chunk)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "consumed": self.consumed}
        if self.stateful and not self.map_style:
            state["dataset"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], *, step: int) -> None:
        """Continue after `step` completed steps, from a state that state_dict() returned."""
        self.epoch, self.consumed = divmod(step, self.steps_per_epoch)
        if self.epoch and not self.consumed:  # the end of an epoch: next_batch() opens the next one
            self.epoch, self.consumed = self.epoch - 1, self.steps_per_epoch
        if "position" in state and "epoch" not in state:  # written by the byte LM before the Task API
            self.data.load_state_dict(state)
            return
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._iter = None
        if "dataset" in state:
            self.data.load_state_dict(state["dataset"])
        elif not self.map_style and not self.stateful:
            self._replay = self.consumed


def _endless(stream: Any) -> Iterator[Any]:
    """A stateful batch stream with next_batch() (the byte LM's) or a plain iterator."""
    if callable(getattr(stream, "next_batch", None)):
        while True:
            yield stream.next_batch()
    yield from stream


def validation_batches(task: Task, *, batch_size: int, limit: int) -> Iterator[Any]:
    """The validation data in a fixed order (the first `limit` batches; 0 = all of them)."""
    data = task.val_data
    if task.batched:
        batches: Any = iter(data)
    elif is_map_style(data):
        batches = iter(DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=task.collate_fn or default_collate,
                                  num_workers=task.num_workers))  # fmt: skip
    else:
        collate = task.collate_fn or default_collate
        items = iter(data)
        batches = iter(lambda: list(itertools.islice(items, batch_size)), [])
        batches = (collate(chunk) for chunk in batches)
    return itertools.islice(batches, limit) if limit else batches


def check_steps(train: TrainBatches, steps_per_epoch: int) -> int:
    """The epoch length: config's steps_per_epoch, or one full pass when it is 0."""
    if steps_per_epoch:
        return steps_per_epoch
    full = train.full_pass_steps()
    if not full:
        raise TaskError(
            "the training data has no length, so one pass cannot be counted; set steps_per_epoch (> 0) in the config"
        )
    return full
