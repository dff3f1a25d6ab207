"""Which run the cells act on (issue 11, problems 1-5), the live output (6) and the form (8), in-process.

Runs are real, trained once per module: `stale` (oldest), `alpha`, then `beta` (newest, seed 3), and
`kill_early`, a run folder killed before its first checkpoint. Each test copies them where it needs them.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_config
from utils.training.cells import parameters, recovery, training
from utils.training.cells._live import EVENTS_LOGGER, live_events, print_table
from utils.training.cells._namespace import notebook_words


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from utils.training.engine.trainer import Trainer

    base = tmp_path_factory.mktemp("runs")
    made = {}
    for name, seed in (("stale", 1), ("alpha", 1337), ("beta", 3)):  # in this order: beta is the newest
        config = tiny_config(base / name, run_name=name, seed=seed, epochs=1)
        Trainer(config, resume="never", progress=False).fit()
        made[name] = base / name
    (base / "beta" / "checkpoints" / "kill_early").mkdir()
    (base / "beta" / "checkpoints" / "kill_early" / "run.json").write_text('{"run_name": "kill_early"}')
    return made


def copy(runs: dict[str, Path], name: str, where: Path) -> Path:
    shutil.copytree(runs[name], where, dirs_exist_ok=True)
    return where


def planned(workspace: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """A namespace as the Parameters cell leaves it."""
    return {"planned_config": tiny_config(workspace, run_name=name, epochs=1, **overrides), "run_action": "parameters"}


def close(ns: dict[str, Any]) -> None:
    if ns.get("db") is not None:
        ns["db"].close()


def test_problem_1_a_chosen_run_without_a_checkpoint_is_said_never_swapped(runs, tmp_path, capsys) -> None:
    ws = copy(runs, "beta", tmp_path / "ws")
    copy(runs, "alpha", Path.cwd() / "training_output")
    ns: dict[str, Any] = {}
    assert recovery.recover_into(ns, str(ws / "checkpoints" / "kill_early"), "the run picker") is False
    out = capsys.readouterr().out
    assert "no complete checkpoint there" in out and "Recovered" not in out and "results" not in ns
    assert recovery.recover_into(ns, str(ws / "checkpoints" / "beta"), "the run picker") is True
    assert ns["results"]["run_name"] == "beta"
    close(ns)


def test_problem_1_a_damaged_checkpoint_is_listed_once(runs, tmp_path, capsys) -> None:
    ws = copy(runs, "alpha", tmp_path / "ws")
    run_dir = ws / "checkpoints" / "alpha"
    newest = sorted(run_dir.glob("step-*"))[-1]
    shutil.copytree(newest, run_dir / "step-999999")
    (run_dir / "step-999999" / "MANIFEST.json").write_text("{broken")
    ns: dict[str, Any] = {}
    recovery.run(ns, checkpoint_directory=str(ws))
    out = capsys.readouterr().out
    assert ns["results"]["run_name"] == "alpha" and out.count("step-999999") == 1, out
    close(ns)


def test_problem_2_the_parameters_run_wins_over_a_newer_one(runs, tmp_path, capsys) -> None:
    ws = copy(runs, "alpha", tmp_path / "ws")
    copy(runs, "beta", ws)  # beta is newer, in the same workspace
    ns = planned(ws, "alpha")
    recovery.run(ns)
    assert ns["results"]["run_name"] == "alpha"
    close(ns)
    ns = planned(ws, "ghost")  # planned, never trained: said, the others listed, the newest taken
    recovery.run(ns)
    out = capsys.readouterr().out
    assert (
        "run 'ghost' has no complete checkpoint" in out and "'alpha'" in out and "Recovering the newest, 'beta'" in out
    )
    assert ns["results"]["run_name"] == "beta"
    close(ns)


def test_problem_3_training_after_recovery_continues_the_recovered_run_with_its_config(runs, tmp_path, capsys) -> None:
    ws = copy(runs, "alpha", tmp_path / "ws")
    copy(runs, "beta", ws)
    ns = planned(ws, "alpha")  # seed 1337; beta was trained with seed 3
    recovery.run(ns, checkpoint_directory=str(ws / "checkpoints" / "beta"))
    ns["training_config"] = ns["training_config"].replace(epochs=2)  # so there is something left to train
    training.run(ns, progress=False)
    out = capsys.readouterr().out
    assert "Continuing the recovered run 'beta'" in out and "does not match" not in out
    assert ns["results"]["run_name"] == "beta" and ns["results"]["config"]["seed"] == 3
    assert "completed, 2 epoch(s)" in out
    close(ns)
    ns["planned_config"], ns["run_action"] = tiny_config(ws, run_name="alpha", epochs=1), "parameters"
    training.run(ns, progress=False)  # Parameters after Recovery: the plan again
    assert ns["results"]["run_name"] == "alpha"
    close(ns)


def test_problem_4_newest_across_every_location_by_saved_at(runs, capsys) -> None:
    copy(runs, "beta", Path.cwd() / "tmp_training_output")  # searched after ./training_output
    stale = copy(runs, "stale", Path.cwd() / "training_output")
    for path in stale.rglob("*"):  # a newer file time must not matter: saved_at inside the checkpoint does
        path.touch()
    ns: dict[str, Any] = {}
    recovery.run(ns)
    assert ns["results"]["run_name"] == "beta"
    assert [r.name for r in recovery.runs_on_disk(ns)] == ["beta", "stale", "kill_early"]
    assert "the newest run" in capsys.readouterr().out
    close(ns)


def test_problem_4_training_workspace_is_searched(runs, tmp_path, monkeypatch) -> None:
    copy(runs, "stale", Path.cwd() / "training_output")
    monkeypatch.setenv("TRAINING_WORKSPACE", str(copy(runs, "alpha", tmp_path / "elsewhere")))
    ns: dict[str, Any] = {}
    recovery.run(ns)
    assert ns["results"]["run_name"] == "alpha"
    close(ns)


def test_problem_5_recovery_straight_after_training_keeps_the_model_and_records_nothing(make_config, tmp_path):
    ns: dict[str, Any] = {"planned_config": make_config(tmp_path / "w", epochs=1), "run_action": "parameters"}
    training.run(ns, progress=False)
    model = ns["model"]
    recovery.run(ns)
    assert ns["model"] is model and ns["results"]["recovered"] is False
    close(ns)
    with sqlite3.connect(tmp_path / "w" / "experiments.db") as db:
        assert db.execute("SELECT count(*) FROM runs WHERE name LIKE '%_recovered'").fetchone() == (0,)


def test_problem_6_events_and_epoch_rows_are_printed_as_they_happen(capsys) -> None:
    events = logging.getLogger(EVENTS_LOGGER)
    with live_events(epochs=30) as printer:
        events.info("checkpoint saved at step 40")
        assert capsys.readouterr().out == "  checkpoint saved at step 40\n"  # now, not when training ends
        events.info("epoch done", extra={"epoch_row": {"epoch": 3, "train/loss": 3.1, "val/loss": 2.85,
                                                        "val/accuracy": 0.5, "epoch_seconds": 4.2}})  # fmt: skip
        assert (
            capsys.readouterr().out
            == "  epoch 3/30  train/loss 3.1000  val/loss 2.8500  val/accuracy 0.5000  (4.2 s)\n"
        )
        events.info("stopped; start the same training again to resume")
    assert "re-run the Training cell to continue" in capsys.readouterr().out
    assert printer.rows_printed == 1 and len(printer.said) == 2
    events.info("after the cell")
    assert capsys.readouterr().out == ""


def test_problem_8_tables_are_compact_and_messages_use_notebook_words(capsys) -> None:
    print_table([{"epoch": e, "train/loss": 1.0, "val/loss": 2.0} for e in range(1, 31)])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 7 and "25 earlier epoch(s)" in out[1] and out[-1].split()[0] == "30"
    text = notebook_words(
        "use a new run name, continue it with resume=auto or set corpus to a file; "
        "start the same training again to resume"
    )
    assert "--" not in text and "run_name (Parameters cell)" in text and "Training cell" in text


def test_problem_8_the_form_sets_cadence_retention_seed_data_and_a_new_run(runs, tmp_path, capsys) -> None:
    ws = copy(runs, "alpha", tmp_path / "ws")
    (ws / "checkpoints" / "alpha-2").mkdir()
    corpus = tmp_path / "text.txt"
    corpus.write_text("hello " * 1000)
    ns: dict[str, Any] = {}
    parameters.run(ns, run_name="alpha", workspace=str(ws), save_every_minutes=2, keep_last=5, seed=7,
                   data_path=str(corpus), resume="start a new run")  # fmt: skip
    config = ns["planned_config"]
    assert (config.run_name, config.save_every_seconds, config.keep_last, config.seed) == ("alpha-3", 120, 5, 7)
    assert config.corpus == str(corpus) and ns["planned_resume"] == "auto"
    assert "'alpha' is not touched" in capsys.readouterr().out
    parameters.run(ns, run_name="alpha", workspace=str(ws), epochs=3)
    assert "epochs 1 → 3" in capsys.readouterr().out  # extending a run says how its schedule changes
    step = sorted((ws / "checkpoints" / "alpha").glob("step-*"))[-1]
    parameters.run(ns, run_name="alpha", workspace=str(ws), resume=str(step))
    assert ns["planned_resume"] == str(step)


def test_problem_6_the_run_s_progress_bar_shows_the_last_validation_loss() -> None:
    import io

    from tqdm import tqdm

    with tqdm(total=10, desc="alpha", file=io.StringIO()) as bar, tqdm(total=5, desc="other", file=io.StringIO()):
        with live_events(epochs=2, run_name="alpha"):
            logging.getLogger(EVENTS_LOGGER).info("epoch", extra={"epoch_row": {"epoch": 1, "val/loss": 2.5}})
            logging.getLogger(EVENTS_LOGGER).info("epoch", extra={"epoch_row": {"epoch": 2, "val/loss": 2.25}})
        assert bar.desc == "alpha · val/loss 2.250"
        assert [b.desc for b in tqdm._instances if b is not bar] == ["other"]


def test_the_runs_are_listed_as_text_unless_the_picker_is_asked_for(runs, tmp_path, capsys) -> None:
    ws = copy(runs, "alpha", tmp_path / "ws")
    copy(runs, "beta", ws)
    ns: dict[str, Any] = {}
    recovery.picker(ns, checkpoint_directory=str(ws), show=False)
    out = capsys.readouterr().out
    assert ns["run_picker"] is None and "3 runs on disk, newest first" in out and "tick show_run_picker" in out
    assert out.index("'beta'") < out.index("'alpha'") < out.index("'kill_early'")
    recovery.picker(ns, checkpoint_directory=str(ws))
    assert [o[0].split()[0] for o in ns["run_picker"].children[1].children[0].options] == [
        "beta",
        "alpha",
        "kill_early",
    ]


def test_training_after_a_failed_parameters_cell_trains_nothing(tmp_path, capsys) -> None:
    ns: dict[str, Any] = {}
    parameters.run(ns, epochs="three", workspace=str(tmp_path / "w"))
    training.run(ns, progress=False)
    out = capsys.readouterr().out
    assert "no plan to train" in out and "results" not in ns and not (tmp_path / "w").exists()
