"""The bytes of a checkpoint's files: weights as safetensors (streamed, tied tensors stored once) and
the training state as safetensors + a JSON structure (format-2 checkpoints: torch.load(weights_only=True))."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load

from .commit import CheckpointCorrupt, HashingWriter

MODEL_FILE = "model.safetensors"
# Optimizer, scheduler, scaler, RNG, data position: tensors + a JSON structure in the metadata.
STATE_FILE = "training_state.safetensors"
# Manifest format 2 and before (and states this layout cannot describe): torch.save's zip.
LEGACY_STATE_FILE = "training_state.pt"
STATE_FORMAT = "training-state-1"
STRUCTURE_KEY = "structure"
ZIP_MAGIC = b"PK\x03\x04"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(writer: HashingWriter, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream tensors in the safetensors layout (8-byte header length, JSON header, raw
    little-endian data) straight into the hashing writer: one pass, no full-file copy."""
    writer.write(safetensors_header(tensors, metadata))
    for t in tensors.values():
        if t.numel():
            writer.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, data_align: int = 8) -> bytes:
    """The bytes before the data of a safetensors file: the header's length (8 bytes, little-endian)
    and its JSON, padded with spaces (the format allows it) so that the data starts at a multiple of
    `data_align` (8, or a page for a file written with O_DIRECT). Raises TypeError for a dtype
    safetensors cannot store."""
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
    raw += b" " * (-(8 + len(raw)) % data_align)
    return struct.pack("<Q", len(raw)) + raw


def storable(t: torch.Tensor) -> bool:
    """Whether safetensors can store `t` as it is (a dense tensor of one of its dtypes)."""
    return t.dtype in _DTYPES and t.layout == torch.strided and not t.is_sparse


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


def save_training_state(state: dict[str, Any], writer: HashingWriter) -> str:
    """Write the training state into the hashing writer; returns the file name its format goes by
    (STATE_FILE, or LEGACY_STATE_FILE for a state that needed torch.save)."""
    encoded = encode_training_state(state)
    write_training_state(writer, state, encoded)
    return STATE_FILE if encoded is not None else LEGACY_STATE_FILE


def write_training_state(
    writer: HashingWriter, state: dict[str, Any], encoded: tuple[dict[str, torch.Tensor], str] | None
) -> None:
    """The state's tensors go into a safetensors file and its structure (dicts, lists, numbers,
    strings, where each tensor sits) into that file's JSON metadata: the writer thread then does
    little besides GIL-free copies and writes, and nothing a load reads can run code. A state
    holding a value this layout cannot describe (`encoded` is None: a complex tensor, say) is
    written with `torch.save`, zip CRC32 included: no process-wide torch setting is changed."""
    if encoded is None:
        _torch_save(state, writer)
        return
    tensors, structure = encoded
    write_safetensors(writer, tensors, training_state_metadata(structure))


def training_state_metadata(structure: str) -> dict[str, str]:
    """The safetensors metadata of a training-state file: its format and the JSON structure."""
    return {"format": STATE_FORMAT, STRUCTURE_KEY: structure}


def model_metadata(aliases: dict[str, str], step: int) -> dict[str, str]:
    """The safetensors metadata of a weights file: the tied names it stores once, and its step."""
    return {"aliases": json.dumps(aliases), "step": str(step)}


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
    """Load a training state written by either format, told apart by content (a save that fell back
    to torch.save, a distributed rank file, `training_state.pt` of format 2): a zip only through
    `torch.load(weights_only=True)`, anything else only as safetensors + its JSON structure."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == ZIP_MAGIC:
            return torch.load(path, map_location=map_location, weights_only=True)
        return _read_safetensors_state(path, map_location)
    except OSError:
        raise
    except Exception as exc:  # an UnpicklingError for a payload that tries to run code, a bad zip or header
        raise CheckpointCorrupt(
            path,
            f"refused to load {path.name}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}",
            f"a {path.name} must hold only tensors and plain values; this file does not, so it was not executed",
        ) from exc


def _read_safetensors_state(path: Path, map_location: str | torch.device) -> Any:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != STATE_FORMAT or STRUCTURE_KEY not in metadata:
            raise ValueError(f"not a training state (metadata format {metadata.get('format')!r})")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if str(map_location) != "cpu":
        tensors = {name: t.to(map_location) for name, t in tensors.items()}
    return decode_structure(json.loads(metadata[STRUCTURE_KEY]), tensors)


# -- the structure of a training state as JSON ---------------------------------------------
class _NotEncodable(Exception):
    """A value the safetensors + JSON layout cannot describe (the save falls back to torch.save)."""


def encode_training_state(state: Any) -> tuple[dict[str, torch.Tensor], str] | None:
    """(tensors by name, the JSON structure that places them), or None when a value does not fit."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        structure = _encode(state, tensors)
        return tensors, json.dumps(structure, separators=(",", ":"), allow_nan=False)
    except (_NotEncodable, ValueError):
        return None


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    # Tagged one-key dicts mark everything JSON cannot say itself; plain dicts never appear raw.
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj if type(obj) is int else _encode_other(obj, tensors)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in _DTYPES or obj.is_sparse or obj.layout != torch.strided:
            raise _NotEncodable(f"tensor of dtype {obj.dtype}, layout {obj.layout}")
        name = str(len(tensors))
        tensors[name] = obj.detach()
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[_encode_key(k), _encode(v, tensors)] for k, v in obj.items()]}
    if type(obj) is list:
        return [_encode(v, tensors) for v in obj]
    if type(obj) is tuple:
        return {"tuple": [_encode(v, tensors) for v in obj]}
    return _encode_other(obj, tensors)


def _encode_key(key: Any) -> Any:
    if key is None or isinstance(key, (bool, str)) or type(key) is int:
        return key
    if type(key) is float and math.isfinite(key):
        return {"float": repr(key)}
    raise _NotEncodable(f"dict key {key!r}")


def _encode_other(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Size):
        return {"size": list(obj)}
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"device": str(obj)}
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, numpy.ndarray) and obj.dtype.kind in "biuf":
        raw = torch.from_numpy(numpy.ascontiguousarray(obj).reshape(-1).view(numpy.uint8).copy())
        name = str(len(tensors))
        tensors[name] = raw
        return {"ndarray": name, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if numpy is not None and isinstance(obj, numpy.generic) and obj.dtype.kind in "biuf":
        return {"scalar": obj.dtype.str, "value": obj.item()}
    raise _NotEncodable(type(obj).__name__)


def decode_structure(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [decode_structure(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "dict" in node:
        return {_decode_key(k): decode_structure(v, tensors) for k, v in node["dict"]}
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "tuple" in node:
        return tuple(decode_structure(v, tensors) for v in node["tuple"])
    if "float" in node:
        return float(node["float"])
    if "size" in node:
        return torch.Size(node["size"])
    if "dtype" in node and len(node) == 1:
        dtype = getattr(torch, node["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {node['dtype']!r}")
        return dtype
    if "device" in node:
        return torch.device(node["device"])
    import numpy  # only states that held numpy values get here

    if "ndarray" in node:
        raw = tensors[node["ndarray"]].cpu().numpy()
        return raw.view(numpy.dtype(node["dtype"])).reshape(node["shape"]).copy()
    if "scalar" in node:
        return numpy.dtype(node["scalar"]).type(node["value"])
    raise ValueError(f"unknown structure node with keys {sorted(node)}")


def _decode_key(key: Any) -> Any:
    return float(key["float"]) if isinstance(key, dict) else key
