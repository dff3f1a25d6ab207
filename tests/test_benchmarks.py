"""Smoke test of the benchmark suite: every group runs at a tiny size and reports well-formed results.

No assertion on speed here: speed targets live in `python -m benchmarks`, not in timed tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import GROUPS, SMOKE, format_table, run_suite
from benchmarks.__main__ import main

REQUIRED_KEYS = (
    "async_stall_ratio",
    "save_vs_disk",
    "recover_vs_naive",
    "loop_vs_plain",
    "checkpoint_overhead",
    "db_points_per_second",
    "save_peak_rss_ratio",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("bench")
    return run_suite(SMOKE, workdir=workdir), workdir


def test_every_required_key_has_ratio_target_met_and_raw_figures(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    results = json.loads(json.dumps(results))  # what --json prints must survive a round trip
    for key in REQUIRED_KEYS:
        entry = results[key]
        assert isinstance(entry["ratio"], float), key
        op, value = entry["target"].split()
        assert op in ("<=", ">="), key
        assert entry["met"] is (entry["ratio"] <= float(value) if op == "<=" else entry["ratio"] >= float(value)), key
        raw = set(entry) - {"ratio", "target", "met", "note", "method"}
        assert raw, f"{key} carries no raw figures"
        assert entry["method"], key
    assert results["meta"]["sizes"]["save_state_mib"] == SMOKE.save_state_mib
    assert set(results["meta"]["group_seconds"]) == set(GROUPS)


def test_ratios_are_made_of_the_raw_figures_beside_them(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    save = results["save_vs_disk"]
    assert save["ratio"] == pytest.approx(save["raw_write_seconds"] / save["sync_save_seconds"], rel=1e-3)
    stall = results["async_stall_ratio"]
    assert stall["ratio"] == pytest.approx(stall["stall_seconds"] / stall["sync_save_seconds"], rel=1e-3)
    loop = results["loop_vs_plain"]
    assert loop["ratio"] == pytest.approx(loop["engine_tokens_per_second"] / loop["plain_tokens_per_second"], rel=1e-3)
    overhead = results["checkpoint_overhead"]
    expected = 1 - overhead["with_checkpoints_tokens_per_second"] / overhead["without_tokens_per_second"]
    assert overhead["ratio"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert results["recover_vs_naive"]["checkpoints"] == SMOKE.every_step_checkpoints


def test_recover_opens_metadata_only(smoke: tuple[dict[str, Any], Path]) -> None:
    read = smoke[0]["recover_bytes_read"]
    names = {Path(p).name for p in read["files_opened"]}
    assert names and names <= {"MANIFEST.json", "trainer_state.json", "run.json", "metrics.jsonl", "steps.jsonl"}
    assert 0 < read["bytes_read"] < read["bytes_on_disk"]


def test_work_folder_is_removed_and_table_lists_every_result(smoke: tuple[dict[str, Any], Path]) -> None:
    results, workdir = smoke
    assert list(workdir.iterdir()) == []
    table = format_table(results)
    for key in REQUIRED_KEYS:
        assert f"`{key}`" in table


def test_cli_names_an_unknown_group(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--only", "save,nope"])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err
