"""Issue 10 on the Task API: the exactness check covers a task's data fingerprint and lets logging
settings change; a task run and a CheckpointedRun never start over (nor touch their logs) when
every checkpoint is damaged, and a fallback sets the damaged checkpoint aside instead of deleting it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from utils.training import CheckpointedRun, Task, TrainingConfig
from utils.training.engine.checkpoint import list_checkpoints
from utils.training.engine.exactness import ConfigChanged
from utils.training.engine.metrics_log import METRICS_FILE, STEPS_FILE
from utils.training.engine.recovery import recover
from utils.training.engine.rollback import ResumeRefused
from utils.training.engine.trainer import Trainer

spec = importlib.util.spec_from_file_location("mytask", Path(__file__).parent / "user_tasks" / "mytask.py")
mytask = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mytask)


def file_task(cfg: TrainingConfig) -> Task:
    """A task whose training data is a file (task_options["data"]); its fingerprint is the file's hash."""
    raw = Path(cfg.task_options["data"]).read_bytes()
    values = torch.tensor(list(raw[:64]), dtype=torch.float32).unsqueeze(1) / 255
    return Task(model=nn.Linear(1, 1), train_data=TensorDataset(values, values * 2), loss_fn=_mse,
                data_fingerprint=hashlib.sha256(raw).hexdigest()[:16])  # fmt: skip


def _mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def config(workspace: Path, **overrides: Any) -> TrainingConfig:
    settings = dict(workspace_root=str(workspace), run_name="t", epochs=1, steps_per_epoch=0, eval_batches=0,
                    batch_size=8, save_every_seconds=0, device="cpu", keep_last=0)  # fmt: skip
    return TrainingConfig(**{**settings, **overrides})


def logs_of(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in (METRICS_FILE, STEPS_FILE) if (run_dir / name).exists()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_task_whose_data_changed_is_refused_unless_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(64)))
    cfg = config(tmp_path / "ws", task_options={"data": str(data)})
    Trainer(cfg, build_task=file_task, progress=False).fit()
    data.write_bytes(bytes(range(64, 128)))
    before = sorted(p.name for p in cfg.run_dir.iterdir())
    with pytest.raises(ConfigChanged, match="data_fingerprint") as info:
        Trainer(cfg.replace(epochs=2), build_task=file_task, progress=False).fit()
    assert info.value.acceptable and sorted(p.name for p in cfg.run_dir.iterdir()) == before
    results = Trainer(cfg.replace(epochs=2, accept_config_change=True), build_task=file_task, progress=False).fit()
    assert results["status"] == "completed" and results["step"] == 16
    changes = json.loads((cfg.run_dir / "run.json").read_text())["changes"]
    assert [(c["what"], c["step"]) for c in changes] == [("data_fingerprint", 8)]


def test_logging_settings_and_more_epochs_change_freely_on_resume(tmp_path: Path) -> None:
    cfg = config(tmp_path / "ws", log_every_steps=3)
    Trainer(cfg, build_task=mytask.build, progress=False).fit()
    trainer = Trainer(cfg.replace(epochs=2, log_every_steps=1), build_task=mytask.build, progress=False)
    results = trainer.fit()
    assert results["status"] == "completed" and results["step"] == 24
    assert "changes" not in json.loads((cfg.run_dir / "run.json").read_text())
    assert any("epochs 1 -> 2" in m and "12 to 24 steps" in m for m in trainer.messages)


def test_a_task_run_whose_every_checkpoint_is_damaged_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    cfg = config(tmp_path / "ws", epochs=2)
    Trainer(cfg, build_task=mytask.build, progress=False).fit()
    for _, path in list_checkpoints(cfg.run_dir):
        flip_a_byte(path / "model.safetensors")  # same size: only a hash check sees it
    listing, logs = sorted(p.name for p in cfg.run_dir.iterdir()), logs_of(cfg.run_dir)
    with pytest.raises(ResumeRefused) as info:
        Trainer(cfg.replace(epochs=3), build_task=mytask.build, progress=False).fit()
    assert {Path(d["path"]).name for d in info.value.damaged} == {"step-000012", "step-000024"}
    assert "resume_never" in info.value.choices
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == listing and logs_of(cfg.run_dir) == logs


def _loop(workspace: Path, until: int) -> int:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainingConfig(save_every_steps=2, save_every_seconds=0, keep_last=0, async_save=False)
    with CheckpointedRun(workspace, "loop", model=model, optimizer=optimizer, config=cfg) as run:
        step = start = run.restore()
        while step < until:
            x = torch.randn(4, 2)
            loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            run.log(step, {"loss": loss.item()})
            if step % 2 == 0:
                run.end_epoch(step // 2, {"loss": loss.item()})
            run.maybe_save(step)
    return start


def test_checkpointed_run_refuses_when_no_checkpoint_verifies_and_keeps_its_logs(tmp_path: Path) -> None:
    _loop(tmp_path, 4)
    run_dir = tmp_path / "checkpoints" / "loop"
    for _, path in list_checkpoints(run_dir):
        flip_a_byte(path / "model.safetensors")
    listing, logs = sorted(p.name for p in run_dir.iterdir()), logs_of(run_dir)
    with pytest.raises(ResumeRefused, match="none verifies"):
        _loop(tmp_path, 6)
    assert sorted(p.name for p in run_dir.iterdir()) == listing and logs_of(run_dir) == logs
    assert logs[METRICS_FILE].count(b"\n") == 2 and logs[STEPS_FILE].count(b"\n") == 4


def test_checkpointed_run_sets_a_damaged_newest_checkpoint_aside(tmp_path: Path) -> None:
    _loop(tmp_path, 4)
    run_dir = tmp_path / "checkpoints" / "loop"
    flip_a_byte(run_dir / "step-000004" / "model.safetensors")
    assert _loop(tmp_path, 6) == 2  # continued from the newest checkpoint that verifies
    (batch,) = (run_dir / "abandoned").iterdir()
    assert (batch / "step-000004" / "model.safetensors").is_file()  # set aside, not deleted
    assert [s for s, _ in list_checkpoints(run_dir)] == [6, 4, 2]
    skipped = recover(tmp_path, search_dirs=[])["skipped"]
    assert any(str(batch) == s["path"] for s in skipped)
