"""The async save's snapshot: the state copied into host buffers that every save reuses.

On the CPU each safetensors file of a save is built whole in one page-aligned buffer laid out like
the file (header padded so that the data starts on a page): every tensor is copied in pieces that
fit in the L2 cache and each piece is hashed while it is still there, so the file's hash costs no
extra pass over memory, and the writer then writes the buffer without hashing it again, the
page-aligned part with O_DIRECT where the filesystem allows it (no copy into the page cache).
Device tensors (CUDA) are copied non-blocking into pinned buffers and written like a sync save.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

from .commit import new_hasher
from .serialization import safetensors_header, storable

PAGE_BYTES = 4096
COPY_CHUNK_BYTES = 256 * 1024  # a piece, its copy and its hash stay in L2 (fastest of 128 KiB-4 MiB here)
WRITE_CHUNK_BYTES = 8 * 1024 * 1024  # a multiple of PAGE_BYTES
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux only; elsewhere every write is buffered


@dataclass
class FilledFile:
    """A file's exact bytes (`data`, in a page-aligned buffer), their xxh3_128 and their size."""

    data: memoryview
    size_bytes: int
    hash: str


class StateBuffers:
    """Host copies of the state, allocated once and reused by every save (pinned on CUDA so
    that the device-to-host copies of an async save are asynchronous)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._images: dict[str, mmap.mmap] = {}

    def snapshot(self, obj: Any, path: tuple = (), *, copy_cpu: bool = True) -> Any:
        """`obj` with every tensor replaced by its CPU buffer.

        copy_cpu=True (an async save): every tensor is copied; device-to-host copies are queued
        non-blocking, and the caller records an event and waits on it before writing.
        copy_cpu=False (a sync save: nothing runs while it writes): CPU tensors are written from
        where they are, and device tensors are copied *blocking*, so the buffers hold this step's
        values when this returns (a reused buffer would otherwise still hold the last save's)."""
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            if not copy_cpu and src.device.type == "cpu":
                return src
            buf = self._buffers.get(path)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                pin = src.is_cuda and torch.cuda.is_available()
                buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
                self._buffers[path] = buf
            buf.copy_(src, non_blocking=copies_non_blocking(src, copy_cpu=copy_cpu))
            return buf
        if isinstance(obj, dict):
            return {k: self.snapshot(v, (*path, k), copy_cpu=copy_cpu) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [self.snapshot(v, (*path, i), copy_cpu=copy_cpu) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    def fill_file(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> FilledFile:
        """The safetensors file of `tensors` (CPU, see `fillable`) and `metadata`, built in the
        reused buffer `name`: header, then each tensor copied and hashed piece by piece. When this
        returns, the file holds the tensors' values of this moment; they may change afterwards."""
        header = safetensors_header(tensors, metadata, data_align=PAGE_BYTES)
        size = len(header) + sum(t.numel() * t.element_size() for t in tensors.values())
        image = self._images.get(name)
        if image is None or len(image) < size:
            image = self._images[name] = page_aligned_buffer(size)
        out = numpy.frombuffer(image, dtype=numpy.uint8, count=size)
        hasher = new_hasher()
        out[: len(header)] = numpy.frombuffer(header, dtype=numpy.uint8)
        hasher.update(header)
        offset = len(header)
        for t in tensors.values():
            src = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            for start in range(0, len(src), COPY_CHUNK_BYTES):
                piece = src[start : start + COPY_CHUNK_BYTES]
                dst = out[offset + start : offset + start + len(piece)]
                numpy.copyto(dst, piece)
                hasher.update(dst)  # still in cache: the hash costs no second pass over memory
            offset += len(src)
        return FilledFile(data=memoryview(image)[:size], size_bytes=size, hash=hasher.hexdigest())

    def resident_bytes(self) -> int:
        """Host memory these buffers hold between saves."""
        tensors = sum(b.numel() * b.element_size() for b in self._buffers.values())
        return tensors + sum(len(image) for image in self._images.values())

    def release(self) -> None:
        """Free every buffer (the next save allocates them again: its cost is that first touch)."""
        self._buffers = {}
        self._images = {}


def page_aligned_buffer(size: int) -> mmap.mmap:
    """Anonymous memory of at least `size` bytes (whole pages), page-aligned as O_DIRECT needs."""
    return mmap.mmap(-1, max(PAGE_BYTES, -(-size // PAGE_BYTES) * PAGE_BYTES))


def fillable(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether fill_file can build a file of these tensors: plain dense CPU tensors safetensors stores."""
    return all(t.device.type == "cpu" and storable(t) and not t.is_conj() and not t.is_neg() for t in tensors.values())


def copies_non_blocking(src: torch.Tensor, *, copy_cpu: bool) -> bool:
    """Only an async save (copy_cpu=True), which waits on an event before writing, may queue a
    device-to-host copy without waiting for it; a sync save writes right after the copy."""
    return src.device.type != "cpu" and copy_cpu


class FilledFileWriter:
    """Writes a FilledFile: its page-aligned part with O_DIRECT where the filesystem accepts it
    (buffered from the first refusal on: tmpfs, FUSE), the rest buffered; close() fsyncs and
    returns the size and hash taken while the buffer was filled (the bytes written are those)."""

    def __init__(self, path: Path, filled: FilledFile, *, direct: bool = True) -> None:
        self.path = path
        self._filled = filled
        self.direct = bool(direct and _O_DIRECT)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self._fd = -1
        if self.direct:
            try:
                self._fd = os.open(path, flags | _O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self._fd < 0:
            self._fd = os.open(path, flags, 0o644)

    def write_all(self) -> None:
        data = self._filled.data
        direct_end = len(data) // PAGE_BYTES * PAGE_BYTES
        pos = 0
        while pos < len(data):
            if self.direct and (pos >= direct_end or pos % PAGE_BYTES):
                self._stop_direct()  # the tail (or what follows a short write) goes through the page cache
            end = min(direct_end if self.direct else len(data), pos + WRITE_CHUNK_BYTES)
            try:
                pos += os.write(self._fd, data[pos:end])
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._stop_direct()  # accepted at open, refused at write: nothing was written

    def _stop_direct(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self.direct = False

    def close(self) -> dict[str, Any]:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return {"size_bytes": self._filled.size_bytes, "hash": self._filled.hash}

    def abort(self) -> None:
        os.close(self._fd)
