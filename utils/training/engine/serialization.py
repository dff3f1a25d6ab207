"""The bytes of a checkpoint's files: weights as safetensors (streamed, tied tensors stored once)
and the training state through torch.save / torch.load(weights_only=True)."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

try:
    from torch.utils.serialization import config as _serialization_config
except ImportError:  # torch < 2.6 has no switch for the zip CRC32
    _serialization_config = None

from .commit import CheckpointCorrupt, HashingWriter

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(writer: HashingWriter, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream tensors in the safetensors layout (8-byte header length, JSON header, raw
    little-endian data) straight into the hashing writer: one pass, no full-file copy."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    writer.write(struct.pack("<Q", len(raw)) + raw)
    for t in tensors.values():
        if t.numel():
            writer.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share storage (tied embeddings) are stored once; aliases map the rest."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def read_model_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = path.read_bytes()
        tensors = safetensors_load(raw)
        header_len = struct.unpack("<Q", raw[:8])[0]
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
        aliases = json.loads(metadata.get("aliases", "{}"))
        for alias, target in aliases.items():
            tensors[alias] = tensors[target]
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointCorrupt(path, f"not a valid safetensors file ({exc})") from exc
    return tensors


_CRC_SWITCH = threading.Lock()


def save_training_state(state: dict[str, Any], writer: HashingWriter) -> None:
    """`torch.save` streamed straight into the hashing writer: no in-memory copy of the file,
    so a save's peak memory is the snapshot buffers alone. The zip's own CRC32 is skipped
    where torch allows it (it costs as much as the write; the manifest's xxh3 covers every
    byte); `torch.load(weights_only=True)` reads the file either way."""
    save_config = getattr(_serialization_config, "save", None)
    if save_config is None or not hasattr(save_config, "compute_crc32"):
        _torch_save(state, writer)  # an older torch: CRC32 is always computed
        return
    with _CRC_SWITCH:  # a process-wide torch setting: restored as soon as this file is written
        previous = save_config.compute_crc32
        save_config.compute_crc32 = False
        try:
            _torch_save(state, writer)
        finally:
            save_config.compute_crc32 = previous


def _torch_save(state: dict[str, Any], writer: HashingWriter) -> None:
    try:
        torch.save(state, writer)
    except RuntimeError as exc:
        # torch's zip writer reports a failed write (disk full, file too large) as a RuntimeError
        # raised while handling the OSError: surface the OSError, the caller's CheckpointWriteError.
        if isinstance(exc.__context__, OSError):
            raise OSError(exc.__context__.errno, exc.__context__.strerror) from exc
        raise


def read_training_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # an UnpicklingError for a payload that tries to run code, or a bad zip
        raise CheckpointCorrupt(
            path,
            f"refused to load {path.name}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}",
            "a training_state.pt must hold only tensors and plain values; this file does not, so it was not executed",
        ) from exc


# -- snapshot into reusable buffers ---------------------------------------------------------
