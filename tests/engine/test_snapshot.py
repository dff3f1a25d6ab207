"""Files built whole in host memory by an async save: the hash taken while the state is copied in is
the hash of the bytes on disk, the data starts on a page, a state changed after the snapshot does not
reach the file, and O_DIRECT falls back to buffered writes where the kernel refuses it."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from utils.training.engine.checkpoint import (
    LEGACY_STATE_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointManager,
    load_checkpoint,
)
from utils.training.engine.commit import hash_file, new_hasher, read_manifest, verify
from utils.training.engine.snapshot import (
    COPY_CHUNK_BYTES,
    PAGE_BYTES,
    FilledFile,
    FilledFileWriter,
    StateBuffers,
)


def _manager(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(
        run_dir, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min", async_save=True
    )


def _odd_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of every awkward kind: several dtypes, 0-dim, empty, non-contiguous, tied, and one
    that spans several copy pieces with a size that is not a multiple of a page."""
    big = torch.randn(COPY_CHUNK_BYTES // 4 * 3 + 5)
    tied = torch.randn(3, 7)
    model_state = {
        "big": big,
        "half": torch.randn(33, dtype=torch.float64).to(torch.bfloat16),
        "mask": torch.rand(17) > 0.5,
        "count": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(8, 5).t(),
        "embed": tied,
        "head": tied,
    }
    training_state = {"rng": torch.get_rng_state(), "moments": [torch.randn(1000), torch.tensor(3.0)], "epoch": 2}
    return model_state, training_state


def test_the_hash_taken_while_copying_is_the_hash_of_the_file_on_disk(tmp_path: Path) -> None:
    model_state, training_state = _odd_state()
    with _manager(tmp_path) as manager:
        manager.save(1, model_state=model_state, training_state=training_state, trainer_state={"step": 1})
    folder = tmp_path / "step-000001"
    listed = read_manifest(folder)["files"]
    for name in (MODEL_FILE, STATE_FILE):
        on_disk = hash_file(folder / name)
        assert listed[name] == on_disk, f"{name}: the manifest's hash is not the file's"
        raw = (folder / name).read_bytes()
        assert (8 + struct.unpack("<Q", raw[:8])[0]) % PAGE_BYTES == 0, f"{name}: data does not start on a page"
    verify(folder)
    loaded = load_checkpoint(folder)
    for name, tensor in model_state.items():
        assert torch.equal(loaded.model_state[name], tensor), name
    assert loaded.model_state["embed"].data_ptr() == loaded.model_state["head"].data_ptr()  # stored once
    assert torch.equal(loaded.training_state["rng"], training_state["rng"])
    assert torch.equal(loaded.training_state["moments"][0], training_state["moments"][0])
    assert loaded.training_state["epoch"] == 2
    with safe_open(str(folder / MODEL_FILE), framework="pt") as f:  # the padded header is plain safetensors
        assert torch.equal(f.get_tensor("big"), model_state["big"])


def test_an_async_save_holds_the_values_of_the_moment_it_was_called(tmp_path: Path) -> None:
    weights = {"w": torch.randn(COPY_CHUNK_BYTES // 4 * 2 + 123)}  # several copy pieces
    moments = torch.randn(5000)
    expected = (weights["w"].clone(), moments.clone())
    with _manager(tmp_path) as manager:
        manager.save(1, model_state=weights, training_state={"m": moments}, trainer_state={"step": 1})
        manager.wait_for_snapshot()
        weights["w"].add_(1.0)  # the next optimizer step: after the snapshot, before the write
        moments.mul_(-1.0)
    loaded = load_checkpoint(tmp_path / "step-000001")
    assert torch.equal(loaded.model_state["w"], expected[0])
    assert torch.equal(loaded.training_state["m"], expected[1])


def test_a_state_that_needs_torch_save_is_still_saved_by_an_async_save(tmp_path: Path) -> None:
    weights = {"w": torch.randn(64)}
    state = {"z": torch.randn(4, dtype=torch.complex64)}  # safetensors cannot store it: torch.save
    with _manager(tmp_path) as manager:
        manager.save(1, model_state=weights, training_state=state, trainer_state={"step": 1})
    folder = tmp_path / "step-000001"
    assert (folder / LEGACY_STATE_FILE).exists() and not (folder / STATE_FILE).exists()
    assert read_manifest(folder)["files"][MODEL_FILE] == hash_file(folder / MODEL_FILE)
    loaded = load_checkpoint(folder)
    assert torch.equal(loaded.training_state["z"], state["z"])
    assert torch.equal(loaded.model_state["w"], weights["w"])


def _filled(size: int) -> FilledFile:
    buffers = StateBuffers()
    data = torch.arange(size // 4, dtype=torch.int32)
    return buffers.fill_file("f", {"x": data}, {"k": "v"})


@pytest.mark.parametrize("size", [PAGE_BYTES * 3, PAGE_BYTES * 3 + 100, 9 * 1024 * 1024 + 12])
def test_a_filled_file_is_written_byte_for_byte_with_its_hash(tmp_path: Path, size: int) -> None:
    filled = _filled(size)
    writer = FilledFileWriter(tmp_path / "f", filled)
    writer.write_all()
    assert writer.close() == {"size_bytes": filled.size_bytes, "hash": filled.hash}
    assert (tmp_path / "f").read_bytes() == bytes(filled.data)
    assert hash_file(tmp_path / "f") == {"size_bytes": filled.size_bytes, "hash": filled.hash}


def _refuses_unaligned_direct_writes(folder: Path) -> bool:
    probe = folder / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    try:
        os.write(fd, memoryview(mmap.mmap(-1, 2 * PAGE_BYTES))[1 : PAGE_BYTES + 1])
        return False
    except OSError as exc:
        return exc.errno == errno.EINVAL
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux only")
def test_a_direct_write_the_kernel_refuses_falls_back_to_buffered_writes(tmp_path: Path) -> None:
    # A buffer one byte off a page: the kernel refuses it with EINVAL at write time, as FUSE mounts
    # (Drive) and older tmpfs refuse O_DIRECT; the rest of the file goes through the page cache.
    if not _refuses_unaligned_direct_writes(tmp_path):
        pytest.skip(f"{tmp_path} accepts unaligned O_DIRECT writes")
    image = mmap.mmap(-1, 4 * PAGE_BYTES)
    image[:] = os.urandom(len(image))
    data = memoryview(image)[1 : 3 * PAGE_BYTES + 10]
    hasher = new_hasher()
    hasher.update(data)
    filled = FilledFile(data=data, size_bytes=len(data), hash=hasher.hexdigest())
    writer = FilledFileWriter(tmp_path / "f", filled)
    assert writer.direct  # accepted at open
    writer.write_all()
    assert not writer.direct  # refused at the first write, then buffered
    assert writer.close()["hash"] == hash_file(tmp_path / "f")["hash"]
    assert (tmp_path / "f").read_bytes() == bytes(data)
