"""Tests for TrainingConfig: validation messages, presets, the JSON round trip and config files."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from utils.training.config import CONFIG_VERSION, PRESETS, ConfigError, TrainingConfig

# (field, bad value, words the "allowed" part of the message must contain)
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("run_name", "", "1-128 characters"),
    ("run_name", "a/b", "letters, digits"),
    ("run_name", "..", "letters, digits"),
    ("run_name", "x" * 129, "1-128 characters"),
    ("workspace_root", "", "a folder path"),
    ("preset", "huge", "one of"),
    ("seed", -1, "[0, 2**63)"),
    ("seed", 1.5, "[0, 2**63)"),
    ("seed", True, "[0, 2**63)"),
    ("corpus_max_bytes", 10, "[1024, "),
    ("val_fraction", 0.0, "(0, 0.5)"),
    ("val_fraction", 0.5, "(0, 0.5)"),
    ("val_fraction", float("nan"), "(0, 0.5)"),
    ("n_layer", 0, "[1, 1024]"),
    ("n_head", 0, "[1, 1024]"),
    ("n_embd", 65, "multiple of n_head"),
    ("context_length", "64", "[1, "),
    ("batch_size", 0, "[1, "),
    ("dropout", 1.0, "[0, 1)"),
    ("learning_rate", 0.0, "(0, 1]"),
    ("learning_rate", float("inf"), "(0, 1]"),
    ("learning_rate", 2.0, "(0, 1]"),
    ("min_lr_ratio", 1.5, "[0, 1]"),
    ("warmup_steps", -1, "[0, "),
    ("weight_decay", -0.1, ">= 0"),
    ("beta1", 1.0, "[0, 1)"),
    ("beta2", -0.1, "[0, 1)"),
    ("grad_clip", -1.0, ">= 0"),
    ("epochs", 0, "[1, 100000]"),
    ("epochs", 100_001, "[1, 100000]"),
    ("epochs", 2.0, "[1, 100000]"),
    ("steps_per_epoch", -1, "[0, "),
    ("eval_batches", -1, "[0, "),
    ("log_every_steps", -1, "[0, "),
    ("task_options", [1], "JSON object"),
    ("save_every_steps", -5, "[0, "),
    ("save_every_seconds", -1.0, ">= 0"),
    ("keep_last", -1, "[0, "),
    ("keep_best", -1, "[0, "),
    ("monitor_metric", "", "metric name"),
    ("monitor_mode", "lowest", "'min' or 'max'"),
    ("async_save", "yes", "true or false"),
    ("on_save_error", "ignore", "'stop' or 'continue'"),
    ("device", "tpu", "'cuda:N'"),
    ("device", "cuda:x", "'cuda:N'"),
    ("precision", "fp8", "'bf16'"),
    ("distributed_strategy", "zero3", "'ddp' or 'fsdp'"),
    ("config_version", 0, "[1, "),
    ("release_snapshot_buffers", "yes", "true or false"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_VALUES])
def test_a_bad_value_raises_one_error_naming_the_field_and_the_allowed_range(field: str, value: Any, allowed: str):
    with pytest.raises(ConfigError) as info:
        TrainingConfig(**{field: value})
    message = str(info.value)
    assert f"config field {field}=" in message
    assert "allowed" in message and allowed in message
    assert "\n" not in message  # one line, fit for a CLI error


def test_config_error_is_a_value_error_so_generic_callers_still_catch_it():
    with pytest.raises(ValueError):
        TrainingConfig(epochs=0)


def test_the_first_bad_field_is_reported_alone():
    with pytest.raises(ConfigError) as info:
        TrainingConfig(epochs=0, batch_size=0)
    assert str(info.value).count("config field") == 1


def test_defaults_are_valid_and_paths_derive_from_the_workspace(tmp_path: Path):
    config = TrainingConfig(workspace_root=tmp_path, run_name="exp-1")
    assert config.workspace_root == str(tmp_path)  # a Path is stored as str, so it serialises
    assert config.checkpoint_dir == tmp_path / "checkpoints"
    assert config.run_dir == tmp_path / "checkpoints" / "exp-1"
    assert config.results_dir == tmp_path / "results"
    assert config.db_path == tmp_path / "experiments.db"
    assert config.total_steps == config.epochs * config.steps_per_epoch


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid_and_set_their_sizes(preset: str):
    config = TrainingConfig.from_preset(preset, epochs=3)
    assert config.preset == preset
    assert config.epochs == 3
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value


def test_preset_sizes_grow_from_tiny_to_base():
    sizes = [PRESETS[p]["n_embd"] * PRESETS[p]["n_layer"] for p in ("tiny", "small", "base")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_an_unknown_preset_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"preset='huge'.*'base', 'small', 'tiny'"):
        TrainingConfig.from_preset("huge")


def test_an_override_out_of_range_is_refused_even_through_a_preset():
    with pytest.raises(ConfigError, match="config field keep_last=-2"):
        TrainingConfig.from_preset("tiny", keep_last=-2)


def test_replace_validates_the_new_value():
    config = TrainingConfig.from_preset("tiny")
    assert config.replace(epochs=7).epochs == 7
    with pytest.raises(ConfigError, match="config field epochs=0"):
        config.replace(epochs=0)


def test_json_round_trip_gives_an_equal_config():
    config = TrainingConfig.from_preset(
        "small", run_name="rt", seed=7, corpus="/data/text", save_every_seconds=12.5, async_save=False
    )
    text = config.to_json()
    assert json.loads(text)["config_version"] == CONFIG_VERSION
    again = TrainingConfig.from_json(text)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert "unknown_keys" not in json.loads(text)


def test_to_dict_is_plain_json():
    data = TrainingConfig(workspace_root=Path("/tmp/w")).to_dict()
    assert json.loads(json.dumps(data)) == data


def test_unknown_keys_are_errors_naming_the_closest_known_key():
    """Issue 10 item 17: a misspelt key must never train silently with the default."""
    data = {**TrainingConfig.from_preset("tiny").to_dict(), "learning_rat": 0.1}
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'; did you mean 'learning_rate'"):
        TrainingConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"config_version=2 .*newer version"):
        TrainingConfig.from_dict({"config_version": 2})


def test_known_keys_alone_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = TrainingConfig.from_dict({"epochs": 4})
    assert config.epochs == 4 and config.unknown_keys == {}


def test_a_bad_value_from_json_names_the_field():
    with pytest.raises(ConfigError, match=r"config field batch_size='8'"):
        TrainingConfig.from_json('{"batch_size": "8"}')


@pytest.mark.parametrize("text", ["[1, 2]", '"tiny"', "3"])
def test_json_that_is_not_an_object_is_refused(text: str):
    with pytest.raises(ConfigError, match="JSON object"):
        TrainingConfig.from_json(text)


def test_broken_json_is_refused():
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainingConfig.from_json('{"epochs": ')


def test_load_reads_a_file_written_by_to_json(tmp_path: Path):
    config = TrainingConfig.from_preset("tiny", run_name="from-file", epochs=5)
    path = tmp_path / "config.json"
    path.write_text(config.to_json(), encoding="utf-8")
    assert TrainingConfig.load(path) == config


def _load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        TrainingConfig.load(path)
    return str(info.value)


def test_load_of_a_missing_file_names_the_path(tmp_path: Path):
    path = tmp_path / "nope.json"
    message = _load_error(path)
    assert str(path) in message and "check the path" in message


def test_load_of_a_folder_names_the_path(tmp_path: Path):
    assert str(tmp_path) in _load_error(tmp_path)


def test_load_of_broken_json_names_the_path(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('{"epochs": 2,', encoding="utf-8")
    message = _load_error(path)
    assert str(path) in message and "not valid JSON" in message


def test_load_of_binary_names_the_path(tmp_path: Path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\xff\xfe\x00\x81" * 10)
    message = _load_error(path)
    assert str(path) in message and "UTF-8" in message


def test_load_of_a_bad_value_names_the_path_and_the_field(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"epochs": -3}), encoding="utf-8")
    message = _load_error(path)
    assert str(path) in message and "config field epochs=-3" in message


def test_load_never_evaluates_the_file(tmp_path: Path):
    marker = tmp_path / "evaluated"
    path = tmp_path / "evil.json"
    path.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()", encoding="utf-8")
    _load_error(path)
    assert not marker.exists()


def test_error_message_quotes_the_value_as_python_would_spell_it():
    with pytest.raises(ConfigError) as info:
        TrainingConfig(run_name="bad name")
    assert re.search(r"run_name='bad name'", str(info.value))
