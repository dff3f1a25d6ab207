"""One adapter per framework: build its saving object around the shared model and optimizer, save
step N into a folder, and list the files that save wrote (to fsync them and to damage them)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.saving import save_once
from utils.training.engine.checkpoint import CheckpointManager, step_dir_name


def fsync_tree(root: Path) -> None:
    """What a save that does not fsync would need to be durable: every file, every folder, the parent."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)
    _fsync(root.parent)


def _fsync(path: str | Path) -> None:
    """fsync one file or folder."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Project:
    name = "training-survives"
    fsyncs_itself = True

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.root, self.model, self.optimizer = root, model, optimizer
        self.manager = CheckpointManager(
            root, keep_last=0, keep_best=0, monitor_metric="val/loss", monitor_mode="min", async_save=False
        )

    def save(self, step: int) -> Path:
        save_once(self.manager, step, self.model, self.optimizer)
        return self.root / step_dir_name(step)


class HuggingFace:
    name = "HF Trainer._save_checkpoint"
    fsyncs_itself = False

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(
            output_dir=str(root), use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no"
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        self.root, self.model = root, model
        self.trainer = Trainer(model=model, args=args, optimizers=(optimizer, scheduler))

    def save(self, step: int) -> Path:
        self.trainer.state.global_step = step
        self.trainer._save_checkpoint(self.model, trial=None)
        return self.root / f"checkpoint-{step}"


class Lightning:
    name = "Lightning Trainer.save_checkpoint"
    fsyncs_itself = False

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import lightning.pytorch as pl

        self.root = root
        module = _lightning_module(model, optimizer)
        self.trainer = pl.Trainer(
            max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        )  # fmt: skip
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, _width(model))), batch_size=4)
        self.trainer.fit(module, data)  # one step: the trainer is attached, as when a user saves

    def save(self, step: int) -> Path:
        path = self.root / f"step={step}.ckpt"
        self.trainer.save_checkpoint(path)
        return path


class TorchSave:
    name = "torch.save + fsync"
    fsyncs_itself = False

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.root, self.model, self.optimizer = root, model, optimizer
        root.mkdir(parents=True, exist_ok=True)

    def save(self, step: int) -> Path:
        path = self.root / f"step-{step}.pt"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}, path)
        return path


class DistributedCheckpoint:
    name = "torch.distributed.checkpoint.save"
    fsyncs_itself = False  # its FileSystemWriter fsyncs each file (sync_files=True); the folder is not

    def __init__(self, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.root, self.model, self.optimizer = root, model, optimizer

    def state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, step: int) -> Path:
        import torch.distributed.checkpoint as dcp

        path = self.root / f"step-{step}"
        dcp.save(self.state(), checkpoint_id=str(path))
        return path


ADAPTERS = (Project, HuggingFace, Lightning, TorchSave, DistributedCheckpoint)


def _width(model: torch.nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).in_features


def _lightning_module(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    import lightning.pytorch as pl

    class Wrapped(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer

    return Wrapped()


def timed_durable_save(adapter: Any, step: int) -> dict[str, float]:
    """The save call, then (for a peer that does not fsync) the fsync of what it wrote."""
    start = time.perf_counter()
    path = adapter.save(step)
    call = time.perf_counter() - start
    start = time.perf_counter()
    if not adapter.fsyncs_itself:
        fsync_tree(path) if path.is_dir() else fsync_tree_file(path)
    return {"call": call, "fsync": time.perf_counter() - start, "path": str(path)}


def fsync_tree_file(path: Path) -> None:
    _fsync(path)
    _fsync(path.parent)
