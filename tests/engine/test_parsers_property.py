"""Property tests: the manifest, metrics-log and trainer-state parsers take any bytes without surprise."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from utils.training.engine.commit import (
    FORMAT_VERSION,
    HASH_ALGORITHM,
    MANIFEST_NAME,
    CheckpointCorrupt,
    cheap_check,
    read_manifest,
    write_manifest,
)
from utils.training.engine.metrics_log import METRICS_FILE, read_metrics_log
from utils.training.engine.recovery import build_results
from utils.training.engine.trainer_state import TRAINER_FILE, check_trainer_state, read_trainer_state

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
# Names as a manifest may hold them: plain, nested, hostile ("..", "/abs", NUL, lone surrogates).
member_names = st.text(max_size=30) | st.sampled_from(
    ["../x", "/etc/passwd", "a/../../b", "x\x00y", "\ud800", "a" * 300]
)
manifest_entries = st.dictionaries(
    member_names,
    st.fixed_dictionaries({"size_bytes": st.integers(-5, 2**40) | json_scalars, "hash": hex32 | json_scalars})
    | json_values,
    max_size=4,
)
manifests = st.fixed_dictionaries(
    {},
    optional={
        "format_version": st.integers(-2, FORMAT_VERSION + 2) | json_scalars,
        "hash_algorithm": st.just(HASH_ALGORITHM) | json_scalars,
        "files": manifest_entries | json_values,
        "step": st.integers(0, 10**6) | json_scalars,
        "manifest_hash": hex32 | json_scalars,
    },
)


def _folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="prop-")


# -- the manifest -------------------------------------------------------------------------
@SETTINGS
@given(raw=st.binary(max_size=2000))
def test_any_bytes_as_a_manifest_raise_only_checkpoint_corrupt(raw: bytes) -> None:
    with _folder() as d:
        (Path(d) / MANIFEST_NAME).write_bytes(raw)
        for parse in (read_manifest, cheap_check):
            try:
                assert isinstance(parse(Path(d)), dict)
            except CheckpointCorrupt:
                pass


@SETTINGS
@given(manifest=manifests | json_values)
def test_any_json_as_a_manifest_raises_only_checkpoint_corrupt(manifest: Any) -> None:
    with _folder() as d:
        (Path(d) / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
        for parse in (read_manifest, cheap_check):
            try:
                parse(Path(d))
            except CheckpointCorrupt:
                pass


@SETTINGS
@given(
    sizes=st.dictionaries(st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_]{1,8})?(\.[a-z]{1,4})?", fullmatch=True),
                          st.integers(0, 3000), min_size=1, max_size=5),
    fields=st.dictionaries(st.sampled_from(["step", "epoch", "reason", "metrics"]), json_values, max_size=4),
)  # fmt: skip
def test_a_written_manifest_reads_back_the_same_and_passes_the_cheap_check(
    sizes: dict[str, int], fields: dict[str, Any]
) -> None:
    names = [n for n in sizes if not any(o != n and o.startswith(n + "/") for o in sizes)]  # a file is not a folder
    with _folder() as d:
        folder = Path(d)
        files = {}
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"x" * sizes[name])
            files[name] = {"size_bytes": sizes[name], "hash": "0" * 32}
        write_manifest(folder, files, **fields)
        manifest = cheap_check(folder)
        assert manifest["files"] == files and manifest["format_version"] == FORMAT_VERSION
        for key, value in fields.items():
            assert json.dumps(manifest[key], sort_keys=True) == json.dumps(value, sort_keys=True)  # NaN-safe
        first = sorted(names)[0]
        (folder / first).write_bytes(b"x" * (sizes[first] + 1))  # a size off by one is caught
        try:
            cheap_check(folder)
            raise AssertionError("a file of the wrong size passed the cheap check")
        except CheckpointCorrupt as exc:
            assert first in exc.reason


# -- the metrics log ----------------------------------------------------------------------
@SETTINGS
@given(
    raw=st.binary(max_size=3000)
    | st.lists(json_values, max_size=6).map(lambda v: "\n".join(map(json.dumps, v)).encode())
)
def test_any_bytes_as_a_metrics_log_give_a_list_of_epoch_rows(raw: bytes) -> None:
    with _folder() as d:
        path = Path(d) / METRICS_FILE
        path.write_bytes(raw)
        rows = read_metrics_log(path)
        assert isinstance(rows, list)
        epochs = [r["epoch"] for r in rows]
        assert all(isinstance(e, int) and not isinstance(e, bool) for e in epochs) and epochs == sorted(set(epochs))


metric_rows = st.lists(
    st.fixed_dictionaries(
        {"epoch": st.integers(1, 10**6)},
        optional={"train/loss": st.floats(allow_nan=False), "val/loss": st.floats(allow_nan=False), "note": st.text()},
    ),
    max_size=8,
    unique_by=lambda r: r["epoch"],
)


@SETTINGS
@given(rows=metric_rows, torn=st.binary(max_size=40), nested_garbage=st.integers(0, 50_000))
def test_a_written_metrics_log_reads_back_with_torn_and_hostile_lines_ignored(
    rows: list[dict], torn: bytes, nested_garbage: int
) -> None:
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(len(lines) // 2, b"[" * nested_garbage)  # deeper than the JSON parser recurses
    with _folder() as d:
        path = Path(d) / METRICS_FILE
        path.write_bytes(b"\n".join(lines) + b"\n" + torn.replace(b"\n", b""))
        expected = sorted(rows, key=lambda r: r["epoch"])
        got = read_metrics_log(path)
        if torn.replace(b"\n", b"").strip():
            got = [r for r in got if r in expected]  # a torn tail that happens to be a valid row
        assert got == expected


# -- the trainer state --------------------------------------------------------------------
@SETTINGS
@given(raw=st.binary(max_size=2000))
def test_any_bytes_as_a_trainer_state_raise_only_checkpoint_corrupt(raw: bytes) -> None:
    with _folder() as d:
        (Path(d) / TRAINER_FILE).write_bytes(raw)
        try:
            assert isinstance(read_trainer_state(Path(d)), dict)
        except CheckpointCorrupt:
            pass


trainer_states = st.fixed_dictionaries(
    {},
    optional={
        "format_version": st.integers(-1, 3) | json_scalars,
        "step": st.integers(-1, 100) | json_scalars,
        "epoch": st.integers(-1, 10) | json_scalars,
        "total_steps": st.integers(0, 100) | json_scalars,
        "run_id": st.integers(1, 5) | json_scalars,
        "run_name": st.text(max_size=8) | json_scalars,
        "completed": st.booleans() | json_scalars,
        "resume_count": st.integers(-1, 5) | json_scalars,
        "config": st.dictionaries(st.sampled_from(["monitor_metric", "monitor_mode", "epochs"]), json_values)
        | json_values,
        "metrics_history": st.lists(
            st.dictionaries(st.sampled_from(["epoch", "val/loss", "x"]), json_values), max_size=3
        )
        | metric_rows
        | json_values,
        "drift_history": st.lists(st.dictionaries(st.sampled_from(["epoch", "d"]), json_values), max_size=3)
        | json_values,
        "best": st.fixed_dictionaries({}, optional={"checkpoint": json_scalars, "value": json_scalars}) | json_values,
    },
)


@SETTINGS
@given(state=trainer_states | json_values)
@example(state={"epoch": 1, "metrics_history": [{"epoch": 1, "val/loss": 1.0}], "config": {"monitor_metric": [1]}})
@example(state={"epoch": 2, "metrics_history": [{"epoch": 2}, {"epoch": 2}, {"epoch": 1}], "best": {"value": 1}})
def test_any_json_as_a_trainer_state_is_checked_and_recovery_builds_results_or_refuses(state: Any) -> None:
    """Recovery reads trainer_state.json of a (sealed, so structurally accepted) checkpoint:
    whatever it holds, build_results gives a results dict or CheckpointCorrupt, nothing else."""
    try:
        check_trainer_state(state, "trainer_state.json")
        accepted = True
    except CheckpointCorrupt:
        accepted = False
    with _folder() as d:
        run_dir = Path(d) / "ws" / "checkpoints" / "r"
        step = run_dir / "step-000001"
        step.mkdir(parents=True)
        (step / TRAINER_FILE).write_text(json.dumps(state), encoding="utf-8")
        size = (step / TRAINER_FILE).stat().st_size
        write_manifest(step, {TRAINER_FILE: {"size_bytes": size, "hash": _xxh(step / TRAINER_FILE)}}, step=1)
        try:
            results = build_results(run_dir, checkpoint=step, recovered=True)
        except CheckpointCorrupt:
            assert not accepted
            return
        assert accepted
        json.dumps(results, allow_nan=True)
        epochs = [r["epoch"] for r in results["metrics_history"]]
        assert epochs == sorted(set(epochs)) and all(1 <= e <= results["epoch"] for e in epochs)


def _xxh(path: Path) -> str:
    from utils.training.engine.commit import new_hasher

    hasher = new_hasher()
    hasher.update(path.read_bytes())
    return hasher.hexdigest()


valid_states = st.fixed_dictionaries(
    {
        "format_version": st.just(1),
        "step": st.integers(0, 1000),
        "epoch": st.integers(0, 10),
        "run_name": st.text(max_size=10),
        "run_id": st.none() | st.integers(1, 10**6),
        "completed": st.booleans(),
        "metrics_history": metric_rows,
        "drift_history": st.lists(st.fixed_dictionaries({"epoch": st.integers(0, 10)}), max_size=3),
        "best": st.none()
        | st.fixed_dictionaries({"checkpoint": st.text(max_size=12), "value": st.floats(allow_nan=False)}),
        "config": st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        "wall_seconds": st.floats(min_value=0, allow_infinity=False, allow_nan=False),
    }
)


@SETTINGS
@given(state=valid_states)
def test_a_valid_trainer_state_round_trips(state: dict) -> None:
    with _folder() as d:
        (Path(d) / TRAINER_FILE).write_text(json.dumps(state), encoding="utf-8")
        got = read_trainer_state(Path(d))
    assert json.dumps(got, sort_keys=True) == json.dumps(state, sort_keys=True)  # NaN-safe equality
