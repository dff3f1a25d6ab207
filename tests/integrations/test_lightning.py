"""Lightning: each .ckpt is committed with a seal beside it; the lookup falls back past damage; unsealed loads are refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from frameworks import fit_lightning  # noqa: E402

from utils.training.engine.commit import CheckpointCorrupt  # noqa: E402
from utils.training.integrations.lightning import (  # noqa: E402
    CheckpointDirNotSet,
    NotSealed,
    SealCheckpoints,
    newest_valid_checkpoint,
)


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_each_checkpoint_is_sealed_with_its_global_step(lightning_run: Path) -> None:
    ckpts = sorted((lightning_run / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt",
                                       "epoch=1-step=8.ckpt"]  # fmt: skip
    for ckpt in ckpts:
        seal = json.loads(ckpt.with_name(ckpt.name + ".manifest.json").read_text())
        assert seal["global_step"] == int(ckpt.stem.rsplit("=", 1)[1])
        assert seal["files"][ckpt.name]["size_bytes"] == ckpt.stat().st_size
    assert not list((lightning_run / "checkpoints").glob(".tmp-*"))  # every temp file was renamed into place
    assert newest_valid_checkpoint(lightning_run / "checkpoints") == str(ckpts[-1])


def test_truncated_newest_falls_back_with_a_reason_and_training_continues(
    lightning_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy(lightning_run, tmp_path)
    newest = run / "checkpoints" / "epoch=1-step=8.ckpt"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        resume = newest_valid_checkpoint(run / "checkpoints")
    assert resume == str(run / "checkpoints" / "epoch=1-step=6.ckpt")
    assert any("epoch=1-step=8.ckpt" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)

    trainer = fit_lightning(run, max_steps=10, ckpt_path=resume)
    assert trainer.global_step == 10
    assert newest_valid_checkpoint(run / "checkpoints") == str(run / "checkpoints" / "epoch=2-step=10.ckpt")
    # The damaged save at step 8 was written again, whole, by the resumed run.
    assert newest.stat().st_size > 0
    json.loads(newest.with_name(newest.name + ".manifest.json").read_text())


def test_a_flipped_byte_is_caught_by_the_hash(lightning_run: Path, tmp_path: Path) -> None:
    run = _copy(lightning_run, tmp_path)
    newest = run / "checkpoints" / "epoch=1-step=8.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert newest_valid_checkpoint(run / "checkpoints") == str(run / "checkpoints" / "epoch=1-step=6.ckpt")


def test_loading_an_unsealed_checkpoint_is_refused_clearly(lightning_run: Path, tmp_path: Path) -> None:
    run = _copy(lightning_run, tmp_path)
    ckpt = run / "checkpoints" / "epoch=0-step=4.ckpt"
    ckpt.with_name(ckpt.name + ".manifest.json").unlink()
    with pytest.raises(NotSealed, match="refusing to load it: it has no seal of ours") as info:
        fit_lightning(run, max_steps=6, ckpt_path=str(ckpt))
    assert info.value.path == str(ckpt)
    assert "newest_valid_checkpoint" in info.value.fix


def test_without_the_seal_lightning_crashes_on_a_truncated_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "plain"
    fit_lightning(run, max_steps=4, seal=False)
    newest = run / "checkpoints" / "epoch=0-step=4.ckpt"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    with pytest.raises(Exception) as info:  # noqa: B017 - whatever Lightning raises: it does not fall back
        fit_lightning(run, max_steps=6, seal=False, ckpt_path=str(newest))
    assert not isinstance(info.value, CheckpointCorrupt)


def test_a_model_checkpoint_without_dirpath_is_refused(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from frameworks import lightning_loaders, make_lightning_module
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[SealCheckpoints(), ModelCheckpoint()], default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(CheckpointDirNotSet, match="dirpath"):
        trainer.fit(make_lightning_module(), *lightning_loaders())


def test_a_background_checkpoint_io_is_refused(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from frameworks import lightning_loaders, make_lightning_module
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from utils.training.integrations.lightning import UnsupportedCheckpointIO

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         plugins=[AsyncCheckpointIO()],
                         callbacks=[SealCheckpoints(), ModelCheckpoint(dirpath=tmp_path / "c")])  # fmt: skip
    with pytest.raises(UnsupportedCheckpointIO, match="AsyncCheckpointIO"):
        trainer.fit(make_lightning_module(), *lightning_loaders())


class Opaque:
    """Not a tensor nor a plain type: building it back would need the pickle machinery."""


def test_a_sealed_checkpoint_that_needs_pickle_to_load_is_refused(tmp_path: Path) -> None:
    from lightning.fabric.plugins import TorchCheckpointIO

    from utils.training.integrations.lightning import SealingCheckpointIO, UnsafeCheckpoint

    io = SealingCheckpointIO(TorchCheckpointIO())
    path = tmp_path / "c" / "epoch=0-step=1.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {}, "extra": Opaque()}, path)
    assert newest_valid_checkpoint(tmp_path / "c") == str(path)  # sealed and intact ...
    with pytest.raises(UnsafeCheckpoint, match="weights_only=True"):  # ... but never unpickled
        io.load_checkpoint(path)
    io.remove_checkpoint(path)
    assert not path.exists() and not path.with_name(path.name + ".manifest.json").exists()
