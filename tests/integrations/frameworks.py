"""Helpers of the integration tests: start the Hugging Face child process, build and fit the tiny Lightning run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HF_CHILD = Path(__file__).with_name("hf_child.py")


def run_hf_child(output_dir: Path, weights: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Start tests/integrations/hf_child.py as a real process and wait for it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(HF_CHILD), str(output_dir), str(weights), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO),
    )  # fmt: skip


def make_lightning_module() -> Any:
    import lightning.pytorch as pl
    import torch

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Regression()


def lightning_loaders() -> tuple[Any, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)


def fit_lightning(root: Path, max_steps: int, *, seal: bool = True, ckpt_path: str | None = None) -> Any:
    """Fit the tiny module under `root` (checkpoints in root/checkpoints every 2 steps, all kept;
    CSVLogger logs in root/logs). Returns the trainer."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from utils.training.integrations.lightning import SealCheckpoints

    pl.seed_everything(0, verbose=False)
    callbacks = [SealCheckpoints()] if seal else []
    callbacks.append(ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_top_k=-1))
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=CSVLogger(root, name="logs"),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=1,
    )  # fmt: skip
    train, val = lightning_loaders()
    trainer.fit(make_lightning_module(), train, val, ckpt_path=ckpt_path)
    return trainer
