"""steps.jsonl: one line per logging interval, cut back to the checkpoint on resume (no duplicated
or phantom steps), read tolerantly, returned by recovery as step_history (cut at the recovered
checkpoint's step, thinned past 5,000 lines keeping the last)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from utils.training.engine.checkpoint import list_checkpoints
from utils.training.engine.metrics_log import (
    STEPS_FILE,
    StepsLog,
    read_steps_log,
    thin_rows,
    trim_steps_log,
)
from utils.training.engine.recovery import recover
from utils.training.engine.trainer import Trainer

STEP_KEYS = {"step", "epoch", "train/loss", "learning_rate", "grad_norm", "time"}


def test_lines_are_appended_and_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    log = StepsLog(tmp_path / STEPS_FILE)
    for step in (10, 20, 30):
        log.append({"step": step, "train/loss": 1.0 / step})
    log.close()
    with open(tmp_path / STEPS_FILE, "a") as f:
        f.write('{"step": 40, "train/lo')  # a crash in the middle of an append
    assert [r["step"] for r in read_steps_log(tmp_path / STEPS_FILE)] == [10, 20, 30]
    assert [r["step"] for r in read_steps_log(tmp_path / STEPS_FILE, up_to_step=20)] == [10, 20]
    trim_steps_log(tmp_path / STEPS_FILE, 20)
    lines = (tmp_path / STEPS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]


def test_thinning_keeps_a_uniform_stride_and_the_last_line() -> None:
    rows = [{"step": s} for s in range(1, 12_346)]
    thinned = thin_rows(rows)
    steps = [r["step"] for r in thinned]
    assert len(thinned) <= 5000 and steps[-1] == 12_345
    assert len({b - a for a, b in zip(steps, steps[1:], strict=False)}) == 1
    assert thin_rows(rows[:5000]) == rows[:5000]


def test_a_resumed_run_has_each_step_line_once_and_as_an_uninterrupted_run(
    trained_workspace: dict[str, Any], workspace_copy: Path, make_config
) -> None:
    reference = read_steps_log(Path(trained_workspace["workspace"]) / "checkpoints" / "r" / STEPS_FILE)
    assert [r["step"] for r in reference] == [10] and set(reference[0]) >= STEP_KEYS
    config = make_config(workspace_copy, epochs=2, steps_per_epoch=5, save_every_steps=3, keep_last=0,
                         log_every_steps=2)  # fmt: skip
    shutil.rmtree(workspace_copy)
    Trainer(config, progress=False).fit()
    run_dir = workspace_copy / "checkpoints" / "r"
    full = read_steps_log(run_dir / STEPS_FILE)
    assert [r["step"] for r in full] == [2, 4, 6, 8, 10]
    for step, path in list_checkpoints(run_dir):
        if step > 6:
            shutil.rmtree(path)  # the runtime died after the checkpoint of step 6: lines 8 and 10 are past it
    assert [r["step"] for r in recover(workspace_copy, search_dirs=[])["step_history"]] == [2, 4, 6]
    Trainer(config, progress=False).fit()
    lines = [json.loads(line) for line in (run_dir / STEPS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10]  # no duplicated or phantom steps
    drop = {"time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in lines] == [
        {k: v for k, v in r.items() if k not in drop} for r in full
    ]
