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
from utils.training.engine.checkpoint_index import INDEX_FILE

REQUIRED_KEYS = (
    "async_stall_ratio",
    "async_loop_cost_ratio",
    "save_vs_disk",
    "save_resident_ratio",
    "save_peak_rss_ratio",
    "recover_vs_naive",
    "recover_vs_load_newest",
    "recover_cold_vs_torch_import",
    "recover_bytes_read",
    "recover_at_scale",
    "loop_vs_plain",
    "checkpoint_overhead",
    "db_points_per_second",
    "db_metrics_frame_seconds",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("bench")
    return run_suite(SMOKE, workdir=workdir), workdir


def test_every_required_key_has_the_contract_shape(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    results = json.loads(json.dumps(results))  # what --json prints must survive a round trip
    for key in REQUIRED_KEYS:
        entry = results[key]
        assert isinstance(entry["ratio"], float), key
        assert entry["min"] <= entry["median"] == entry["ratio"] <= entry["max"], key
        op, value = entry["target"].split()
        assert op in ("<=", ">="), key
        within = entry["ratio"] <= float(value) if op == "<=" else entry["ratio"] >= float(value)
        assert entry["met"] is (within and not entry.get("beyond_physical_limit", False)), key
        raw = set(entry) - {"ratio", "min", "median", "max", "median_ci95", "target", "met", "note", "method", "rounds"}
        assert raw, f"{key} carries no raw figures"
        assert entry["method"], key
        assert entry["rounds"] >= 1, key
        assert entry["median_ci95"] is None, key  # SMOKE runs fewer rounds than a 95 % interval needs
    assert results["meta"]["sizes"]["save_state_mib"] == SMOKE.save_state_mib
    assert isinstance(results["meta"]["beyond_physical_limit"], list)
    assert set(results["meta"]["group_seconds"]) == set(GROUPS)


def test_ratios_are_made_of_the_raw_figures_beside_them(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    # SMOKE runs one round of each paired measurement: the median ratio is that round's ratio.
    save = results["save_vs_disk"]
    assert save["ratio"] == pytest.approx(save["raw_write_seconds"] / save["sync_save_seconds"], rel=1e-3)
    stall = results["async_stall_ratio"]
    assert stall["ratio"] == pytest.approx(stall["stall_seconds"] / stall["sync_save_seconds"], rel=1e-3)
    cost = results["async_loop_cost_ratio"]
    lost = (cost["loop_seconds_with_saves"] - cost["loop_seconds_without_saves"]) / cost["saves_per_run"]
    assert cost["loop_seconds_lost_per_save"] == pytest.approx(lost, rel=1e-3, abs=1e-9)
    assert cost["ratio"] == pytest.approx(lost / cost["sync_save_seconds"], rel=1e-3, abs=1e-9)
    loop = results["loop_vs_plain"]
    assert loop["ratio"] == pytest.approx(loop["engine_tokens_per_second"] / loop["plain_tokens_per_second"], rel=1e-3)
    assert loop["plain_adamw_flags"] == loop["engine_adamw_flags"]  # the same optimizer on both sides
    overhead = results["checkpoint_overhead"]
    expected = 1 - overhead["with_checkpoints_tokens_per_second"] / overhead["without_tokens_per_second"]
    assert overhead["ratio"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert results["recover_vs_naive"]["checkpoints"] == SMOKE.every_step_checkpoints
    newest = results["recover_vs_load_newest"]
    assert newest["ratio"] == pytest.approx(newest["recover_seconds"] / newest["load_newest_seconds"], rel=1e-3)
    assert newest["larger_preset"] == SMOKE.recover_larger_preset and newest["larger_checkpoint_mib"] > 0
    larger = newest["larger_recover_seconds"] / newest["larger_load_newest_seconds"]
    assert newest["larger_ratio"] == pytest.approx(larger, rel=1e-3)
    assert newest["floor_ratio"] == pytest.approx(newest["floor_seconds"] / newest["load_newest_seconds"], rel=1e-3)
    raw_lost = cost["raw_disk_seconds_lost_per_save"]
    assert cost["raw_disk_loop_cost_ratio"] == pytest.approx(raw_lost / cost["sync_save_seconds"], rel=1e-3, abs=1e-9)
    beyond = (cost["loop_seconds_lost_per_save"] - raw_lost) / cost["sync_save_seconds"]
    assert cost["beyond_raw_disk_loop_cost_ratio"] == pytest.approx(beyond, rel=1e-3, abs=1e-9)
    if cost["raw_memory_folder"] is not None:  # a tmpfs with room (Linux /dev/shm)
        memory_lost = cost["raw_memory_seconds_lost_per_save"]
        expected = memory_lost / cost["sync_save_seconds"]
        assert cost["raw_memory_loop_cost_ratio"] == pytest.approx(expected, rel=1e-3, abs=1e-9)
        assert not Path(cost["raw_memory_folder"]).exists()  # the tmpfs folder is removed after the run
    resident = results["save_resident_ratio"]
    assert resident["resident_mib"] == pytest.approx(resident["ratio"] * resident["state_mib"], rel=1e-3)
    assert resident["released_resident_mib"] == 0


def test_a_ratio_past_its_physical_limit_is_not_met_and_fails_the_run() -> None:
    from benchmarks.common import entry

    honest = entry([0.9, 0.95, 1.05], ">=", 0.8, physical_limit=1.0, method="m")
    assert honest["met"] and "beyond_physical_limit" not in honest
    flattering = entry([2.1, 2.3, 2.2], ">=", 0.8, physical_limit=1.0, method="m")
    assert (flattering["ratio"], flattering["min"], flattering["max"]) == (2.2, 2.1, 2.3)
    assert flattering["met"] is False and flattering["beyond_physical_limit"] is True
    assert "physical limit" in flattering["note"]


def test_the_median_interval_is_the_binomial_one() -> None:
    from benchmarks.common import entry, median_interval

    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # [min, max] of 5 covers 93.75 %
    assert median_interval([6.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == (1.0, 6.0)  # 96.9 %
    assert median_interval(range(1, 10)) == (2, 8)  # j = 2: 96.1 %; j = 3 would cover 82 %
    assert median_interval(range(1, 22)) == (6, 16)  # j = 6: 97.3 %; j = 7 would cover 92.2 %
    assert entry([float(v) for v in range(1, 22)], "<=", 3.0, method="m")["median_ci95"] == [6.0, 16.0]


def test_minimal_reads_reads_what_recover_reads_and_fails_on_a_run_without_an_index(tmp_path: Path) -> None:
    from benchmarks.recovery import OpenRecorder, minimal_reads, train_every_step_run
    from utils.training.engine.recovery import recover

    run_dir = train_every_step_run(tmp_path / "ws", 2)
    with OpenRecorder() as floor:
        minimal_reads(run_dir)
    with OpenRecorder() as full:
        recover(tmp_path / "ws", search_dirs=[])
    assert sorted(floor.paths) == sorted(full.paths)  # the floor skips no read that recovery makes
    (run_dir / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        minimal_reads(run_dir)


def test_recover_opens_metadata_only(smoke: tuple[dict[str, Any], Path]) -> None:
    read = smoke[0]["recover_bytes_read"]
    names = {Path(p).name for p in read["files_opened"]}
    allowed = {"MANIFEST.json", "trainer_state.json", "run.json", "metrics.jsonl", "steps.jsonl", INDEX_FILE}
    assert names and names <= allowed
    assert [Path(p).name for p in read["files_opened"]].count("MANIFEST.json") == 1  # the index ranks the rest
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


@pytest.mark.slow
def test_the_peer_benchmark_runs_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from benchmarks.peers.__main__ import main as peers_main

    assert (
        peers_main(
            [
                "--state-mib",
                "1",
                "--width",
                "128",
                "--repeats",
                "1",
                "--loop-steps",
                "4",
                "--saves",
                "1",
                "--skip-crash",
                "--json",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert len(results["durable_save"]["frameworks"]) == 5
    assert set(results["async_loop_loss"]["frameworks"]) == {
        "training-survives (async)",
        "DCP async_save",
        "Lightning AsyncCheckpointIO",
    }
    truncated = results["truncated_newest"]
    assert truncated["training-survives"]["outcome"] == "resumed"  # it passes over the damaged newest
    assert truncated["training-survives"]["from"].startswith("step-000001")
    assert len(results["recovery_scan"]) == 4


def test_raw_disk_writes_raise_a_failed_write_where_the_loop_waits(tmp_path: Path) -> None:
    """A write that fails in the writer thread is not silently left out of the loop's cost."""
    import shutil

    from benchmarks.loop_cost import RawDiskWrites

    raw = RawDiskWrites(tmp_path / "raw", {"f": memoryview(bytes(5000))})
    raw.save(1)
    raw.wait_until_finished()
    assert (tmp_path / "raw" / "step-000001" / "f").read_bytes() == bytes(5000)
    shutil.rmtree(tmp_path / "raw")  # the next save's folder cannot be made
    raw.save(2)
    with pytest.raises(FileNotFoundError):
        raw.wait_until_finished()


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    import torch

    from benchmarks.loop import loop_config
    from utils.training.engine.model import ByteTransformer

    config = loop_config(tmp_path_factory.mktemp("lockstep"), "lockstep", 1, 1, 0)
    model = ByteTransformer.from_config(config).train()
    return model, torch.zeros(1, 8, dtype=torch.long)


def test_lockstep_runs_one_step_of_each_loop_in_turn_and_keeps_waits_off_each_clock(byte_lm: tuple[Any, Any]) -> None:
    import time

    from benchmarks.loop import Lockstep

    model, batch = byte_lm
    order: list[str] = []

    def loop(name: str, pause: float) -> None:
        for _ in range(4):
            model(batch)
            order.append(name)
            time.sleep(pause)

    results = Lockstep().run({"slow": lambda: loop("slow", 0.05), "fast": lambda: loop("fast", 0.0)})
    assert order == ["slow", "fast"] * 4
    assert results["slow"]["steps"] == results["fast"]["steps"] == 3  # gaps between 4 training forwards
    assert results["slow"]["median_step_seconds"] >= 0.05
    assert results["fast"]["train_seconds"] < 0.05  # the slow loop's turns are not on the fast loop's clock
    assert results["slow"]["deferred_passes"] == results["fast"]["deferred_passes"] == 0


def test_lockstep_keeps_the_baton_while_a_checkpoint_thread_of_the_running_loop_lives(
    byte_lm: tuple[Any, Any],
) -> None:
    import threading

    from benchmarks.loop import Lockstep
    from utils.training.engine.checkpoint import SAVE_THREAD_PREFIX

    model, batch = byte_lm
    order: list[str] = []
    release = threading.Event()

    def saver() -> None:
        model(batch)
        order.append("saver")
        writer = threading.Thread(target=release.wait, name=f"{SAVE_THREAD_PREFIX}writer")
        writer.start()
        for step in range(3):  # two passes fall due while the writer lives
            model(batch)
            order.append("saver")
            if step == 1:
                release.set()
                writer.join()

    def other() -> None:
        for _ in range(3):
            model(batch)
            order.append("other")

    results = Lockstep().run({"saver": saver, "other": other})
    assert order == ["saver", "saver", "saver", "other", "saver", "other", "other"]
    assert results["saver"]["deferred_passes"] == 2 and results["other"]["deferred_passes"] == 0


def test_lockstep_raises_a_loops_error_after_the_other_loops_end(byte_lm: tuple[Any, Any]) -> None:
    from benchmarks.loop import Lockstep

    model, batch = byte_lm
    finished: list[str] = []

    def broken() -> None:
        model(batch)
        raise RuntimeError("loop failed")

    def fine() -> None:
        for _ in range(3):
            model(batch)
        finished.append("fine")

    with pytest.raises(RuntimeError, match="loop failed"):
        Lockstep().run({"broken": broken, "fine": fine})
    assert finished == ["fine"]
