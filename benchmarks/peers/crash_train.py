"""A small deterministic training run under one framework (`python -m benchmarks.peers.crash_train
FRAMEWORK OUT [--resume]`): 2 epochs of 20 steps, a checkpoint every 5 steps, the final weights in
OUT/final.safetensors. The crash benchmark SIGKILLs it mid-run and runs it again with --resume."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

STEPS, EPOCH_STEPS, SAVE_EVERY, BATCH = 40, 20, 5, 4
STEP_PAUSE_SECONDS = 0.05  # gives the harness time to kill between saves; no effect on the numbers


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(EPOCH_STEPS * BATCH, 16, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.body(x)
        return {"loss": torch.nn.functional.mse_loss(out, y), "logits": out}


def run_hf(out: Path, resume: bool) -> torch.nn.Module:
    from transformers import Trainer, TrainingArguments

    class Pairs(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = dataset()

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, y = self.data[i]
            return {"x": x, "y": y}

    from transformers import TrainerCallback

    class Pause(TrainerCallback):
        def on_step_end(self, *args: object, **kwargs: object) -> None:
            time.sleep(STEP_PAUSE_SECONDS)

    torch.manual_seed(0)
    model = Net()
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, save_steps=SAVE_EVERY,
        save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, learning_rate=1e-2, save_total_limit=None,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[Pause()])
    trainer.train(resume_from_checkpoint=resume or None)
    return model


def run_lightning(out: Path, resume: bool) -> torch.nn.Module:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            time.sleep(STEP_PAUSE_SECONDS)
            return self.net(*batch)["loss"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    pl.seed_everything(0)
    module = Module()
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(out), every_n_train_steps=SAVE_EVERY, save_top_k=-1,
                                               filename="{step}")  # fmt: skip
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoints], default_root_dir=str(out))  # fmt: skip
    ckpt = None
    if resume:
        found = sorted(out.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        ckpt = str(found[-1]) if found else None
    trainer.fit(module, loader, ckpt_path=ckpt)
    return module.net


def main() -> None:
    framework, out, resume = sys.argv[1], Path(sys.argv[2]), "--resume" in sys.argv
    torch.set_num_threads(1)
    model = {"hf": run_hf, "lightning": run_lightning}[framework](out, resume)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))


if __name__ == "__main__":
    main()
