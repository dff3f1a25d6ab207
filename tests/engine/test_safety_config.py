"""Issue 10, items 17 and 9: config and corpus gaps, and the exactness check of a resume."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from utils.training.config import ConfigError, TrainingConfig
from utils.training.engine.data import SNAPSHOT_FILE, CorpusError, load_corpus_bytes, load_run_corpus
from utils.training.engine.exactness import ConfigChanged, check_continuation, cuda_rng_notice
from utils.training.engine.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def train_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "utils.training", "train", "--workspace", str(tmp_path / "ws"), "--device", "cpu",
         "--epochs", "1", "--steps-per-epoch", "2", *args],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


# -- item 17: config ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"learning_rat": 0.01}, "did you mean 'learning_rate'"),
        ({"workspace_root": None}, "workspace_root=None is invalid"),
        ({"corpus": {"path": "x"}}, "corpus={'path': 'x'} is invalid"),
        ({"corpus": ""}, "corpus='' is invalid"),
        ({"steps_per_epoch": 10**12}, "steps_per_epoch=1000000000000 is invalid"),
        ({"batch_size": 10**9}, "batch_size=1000000000 is invalid"),
        ({"keep_last": 10**9}, "keep_last=1000000000 is invalid"),
        ({"config_version": 99}, "config_version=99 is invalid"),
        ({"monitor_metric": "val/los"}, "did you mean 'val/loss'"),
        ({"monitor_metric": "valloss"}, "monitor_metric='valloss' is invalid"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TrainingConfig.from_dict(data)


def test_a_task_metric_may_be_monitored() -> None:
    assert TrainingConfig.from_dict({"monitor_metric": "val/accuracy"}).monitor_metric == "val/accuracy"


def test_the_cli_refuses_an_unknown_key_in_a_config_file_and_trains_nothing(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"learning_rat": 0.5}))
    done = train_cli(tmp_path, "--config", str(config))
    assert done.returncode == 1 and "did you mean 'learning_rate'" in done.stderr
    assert not (tmp_path / "ws").exists()


# -- item 17: corpus ------------------------------------------------------------------------
def test_an_empty_corpus_path_is_an_error_not_the_current_folder(tmp_path: Path) -> None:
    done = train_cli(tmp_path, "--corpus", "")
    assert done.returncode == 1 and "corpus=''" in done.stderr
    assert not (tmp_path / "ws").exists()


def test_binary_files_devices_and_fifos_get_clear_errors(tmp_path: Path) -> None:
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 100)
    with pytest.raises(CorpusError, match="binary file"):
        load_corpus_bytes(str(binary), 10_000)
    with pytest.raises(CorpusError, match="device or special file"):
        load_corpus_bytes("/dev/zero", 10_000)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(CorpusError, match="is a FIFO"):
        load_corpus_bytes(str(fifo), 10_000)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("hello text " * 100)
    (folder / "b.txt").write_bytes(b"\x00\x01" * 100)  # a binary file inside a folder is passed over
    assert load_corpus_bytes(str(folder), 10_000) == ("hello text " * 100).encode()


def test_corpus_max_bytes_bounds_memory_on_a_huge_file(tmp_path: Path) -> None:
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.write(b"a line of text\n" * 1000)
        f.truncate(1_500_000_000)  # sparse: 1.5 GB on paper, no disk used
    script = (
        "import resource, sys; from utils.training.engine.data import load_corpus_bytes; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "data = load_corpus_bytes(sys.argv[1], 1_000_000); "
        "print(len(data), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    done = subprocess.run([sys.executable, "-c", script, str(huge)], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    size, grown_kib = map(int, done.stdout.split())
    assert size == 1_000_000
    assert grown_kib < 100_000, f"reading 1 MB of a 1.5 GB file grew the process by {grown_kib} KiB"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_the_default_corpus_is_snapshotted_so_a_python_upgrade_never_changes_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = load_run_corpus(None, 50_000, run_dir)
    assert (run_dir / SNAPSHOT_FILE).read_bytes() == first
    # What a Python upgrade does to the standard library, seen from the run: different bytes
    # there. The run keeps reading its snapshot.
    (run_dir / SNAPSHOT_FILE).write_bytes(b"# the stdlib as this run first read it\n" * 2000)
    again = load_run_corpus(None, 50_000, run_dir)
    assert again == (b"# the stdlib as this run first read it\n" * 2000)[:50_000]


# -- item 9: the exactness check --------------------------------------------------------------
def saved_and_new(**changes) -> tuple[dict, dict]:
    saved = TrainingConfig.from_preset("tiny").to_dict()
    return saved, {**saved, **changes}


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 16), ("steps_per_epoch", 7), ("learning_rate", 1e-2), ("beta2", 0.9), ("weight_decay", 0.0),
     ("warmup_steps", 9), ("seed", 7), ("min_lr_ratio", 0.5)],
)  # fmt: skip
def test_a_changed_setting_is_refused_naming_field_values_and_fix(field: str, value) -> None:
    saved, new = saved_and_new(**{field: value})
    with pytest.raises(ConfigChanged) as info:
        check_continuation(saved, new, step=10, checkpoint="step-000010")
    exc = info.value
    assert (exc.field, exc.saved, exc.new) == (field, saved[field], value)
    assert field in str(exc) and repr(value) in str(exc) and "accept_config_change" in str(exc)


def test_a_changed_data_fingerprint_is_refused_and_accepted_changes_are_listed() -> None:
    saved, new = saved_and_new(batch_size=16)
    with pytest.raises(ConfigChanged, match="data_fingerprint"):
        check_continuation(saved, saved, step=4, checkpoint="c", saved_fingerprint="aa", new_fingerprint="bb")
    result = check_continuation(saved, new, step=4, checkpoint="c", saved_fingerprint="aa", new_fingerprint="bb",
                                accept=True)  # fmt: skip
    assert [(c["what"], c["old"], c["new"], c["step"]) for c in result.changes] == [
        ("batch_size", 8, 16, 4), ("data_fingerprint", "aa", "bb", 4)
    ]  # fmt: skip


def test_more_epochs_need_no_flag_and_say_how_the_schedule_changes() -> None:
    saved, new = saved_and_new(epochs=4)
    result = check_continuation(saved, new, step=40, checkpoint="c")
    assert result.changes == []
    (notice,) = result.notices
    assert "epochs 2 -> 4" in notice and "re-stretched from 40 to 80 steps" in notice


def test_a_model_shape_change_cannot_be_accepted() -> None:
    saved, new = saved_and_new(n_embd=128)
    with pytest.raises(ConfigChanged, match="n_embd") as info:
        check_continuation(saved, new, step=1, checkpoint="c", accept=True)
    assert not info.value.acceptable


def test_a_cuda_rng_device_count_mismatch_is_reported() -> None:
    assert cuda_rng_notice(2, 2) is None and cuda_rng_notice(0, 1) is None
    assert "2 device(s), this machine has 1" in cuda_rng_notice(2, 1)
    assert "not restored" in cuda_rng_notice(1, 0)


def test_a_resume_with_a_changed_batch_size_is_refused_then_accepted_and_recorded(
    workspace_copy: Path, trained_workspace
) -> None:
    base = trained_workspace["config"].replace(workspace_root=str(workspace_copy))
    run_dir = base.run_dir
    before = sorted(p.name for p in run_dir.iterdir())
    changed = base.replace(batch_size=base.batch_size * 2, epochs=3)
    with pytest.raises(ConfigChanged, match="batch_size"):
        Trainer(changed, progress=False).fit()
    assert sorted(p.name for p in run_dir.iterdir()) == before  # refused before anything moved
    trainer = Trainer(changed.replace(accept_config_change=True), progress=False)
    results = trainer.fit()
    assert results["status"] == "completed" and results["step"] == 15
    changes = json.loads((run_dir / "run.json").read_text())["changes"]
    assert [(c["what"], c["old"], c["new"], c["step"]) for c in changes] == [
        ("batch_size", base.batch_size, base.batch_size * 2, 10)
    ]
    assert any("re-stretched" in m for m in trainer.messages)


def test_a_changed_corpus_file_is_refused_unless_accepted(tmp_path: Path, make_config) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of some text\n" for i in range(3000)))
    config = make_config(tmp_path / "ws", corpus=str(corpus), epochs=1, steps_per_epoch=2)
    Trainer(config, progress=False).fit()
    corpus.write_text("".join(f"other {i} words here\n" for i in range(3000)))
    with pytest.raises(ConfigChanged, match="data_fingerprint"):
        Trainer(config.replace(epochs=2), progress=False).fit()
    results = Trainer(config.replace(epochs=2, accept_config_change=True), progress=False).fit()
    assert results["step"] == 4
