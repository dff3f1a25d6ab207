"""Tests for the commit protocol alone: temp folder, manifest last, rename; removal; checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import xxhash

from utils.training.engine.commit import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TEMP_PREFIX,
    CheckpointCorrupt,
    HashingWriter,
    UnsupportedFormat,
    cheap_check,
    commit_dir,
    new_temp_dir,
    read_capped,
    read_json,
    read_manifest,
    remove_tree,
    subfolders,
    verify,
    write_json_file,
    write_manifest,
)

FILES = {"weights.bin": b"\x00\x01" * 5000, "state.json": b'{"step": 3}', "sub/extra.txt": b"nested"}


def _commit(parent: Path, name: str = "step-000001", files: dict[str, bytes] = FILES, **fields) -> Path:
    """Write files into a temp folder with HashingWriter, manifest last, and commit it."""
    tmp = new_temp_dir(parent, name)
    entries = {}
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        writer = HashingWriter(tmp / rel)
        writer.write(data[: len(data) // 2])
        writer.write(memoryview(data)[len(data) // 2 :])
        entries[rel] = writer.close()
    write_manifest(tmp, entries, step=1, **fields)
    final = parent / name
    commit_dir(tmp, final)
    return final


def test_hashing_writer_records_the_size_and_hash_of_what_it_wrote(tmp_path: Path):
    writer = HashingWriter(tmp_path / "f")
    writer.write(b"hello ")
    writer.write(bytearray(b"world"))
    entry = writer.close()
    assert (tmp_path / "f").read_bytes() == b"hello world"
    assert entry == {"size_bytes": 11, "hash": xxhash.xxh3_128(b"hello world").hexdigest()}


def test_write_json_file_returns_the_entry_of_the_bytes_on_disk(tmp_path: Path):
    entry = write_json_file(tmp_path / "a.json", {"b": [1, 2], "nan": float("nan")})
    raw = (tmp_path / "a.json").read_bytes()
    assert entry == {"size_bytes": len(raw), "hash": xxhash.xxh3_128(raw).hexdigest()}
    assert read_json(tmp_path / "a.json", "a.json")["b"] == [1, 2]


def test_a_committed_folder_is_a_checkpoint_and_its_temp_folder_is_gone(tmp_path: Path):
    final = _commit(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]
    manifest = verify(final)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["step"] == 1
    assert set(manifest["files"]) == set(FILES)
    for rel, data in FILES.items():
        assert manifest["files"][rel]["size_bytes"] == len(data)
        assert manifest["files"][rel]["hash"] == xxhash.xxh3_128(data).hexdigest()
        assert (final / rel).read_bytes() == data


def test_a_temp_folder_is_a_hidden_sibling(tmp_path: Path):
    tmp = new_temp_dir(tmp_path / "run", "step-000007")
    assert tmp.parent == tmp_path / "run" and tmp.name.startswith(TEMP_PREFIX) and "step-000007" in tmp.name
    assert new_temp_dir(tmp_path / "run", "step-000007") != tmp  # two saves never share one


def test_the_manifest_is_written_after_the_files_it_lists(tmp_path: Path):
    final = _commit(tmp_path)
    manifest_time = (final / MANIFEST_NAME).stat().st_mtime_ns
    assert all((final / rel).stat().st_mtime_ns <= manifest_time for rel in FILES)


def test_a_folder_without_its_manifest_is_not_a_checkpoint(tmp_path: Path):
    tmp = new_temp_dir(tmp_path, "step-000001")
    (tmp / "weights.bin").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointCorrupt, match="MANIFEST.json is missing"):
        cheap_check(tmp)


def test_commit_replaces_a_damaged_folder_of_the_same_name(tmp_path: Path):
    old = tmp_path / "step-000001"
    old.mkdir()
    (old / "leftover.bin").write_bytes(b"junk")
    final = _commit(tmp_path)
    assert not (final / "leftover.bin").exists()
    verify(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abandoned", "step-000001"]  # no trash left behind
    # The damaged leftover is set aside, never deleted (issue 10 item 5).
    assert [p.read_bytes() for p in (tmp_path / "abandoned").glob("*/step-000001/leftover.bin")] == [b"junk"]


def test_remove_tree_deletes_the_manifest_before_anything_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    final = _commit(tmp_path)

    class Crash(BaseException):
        pass

    unlinked: list[str] = []
    real_unlink = os.unlink

    def unlink_then_crash(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        unlinked.append(os.path.basename(os.fspath(path)))
        raise Crash  # the process dies right after the first file is deleted

    monkeypatch.setattr(os, "unlink", unlink_then_crash)
    with pytest.raises(Crash):
        remove_tree(final)
    monkeypatch.undo()
    assert unlinked == [MANIFEST_NAME]
    # What the crash left (under its name, or moved aside) still holds the data, and is not a checkpoint.
    left = list(tmp_path.iterdir())
    assert any((p / "weights.bin").exists() for p in left)
    for folder in left:
        with pytest.raises(CheckpointCorrupt):
            cheap_check(folder)


def test_remove_tree_removes_everything_and_tolerates_a_missing_folder(tmp_path: Path):
    final = _commit(tmp_path)
    remove_tree(final)
    assert not final.exists()
    remove_tree(final)  # already gone: nothing to do, no error


def _write_manifest_json(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": FORMAT_VERSION, "hash_algorithm": "xxh3_128", "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize(
    "name",
    ["../outside.bin", "/etc/passwd", "a/../../outside.bin", "sub/../../x", "./x", "", "a//b", "a\\..\\b", "x\x00y"],
)
def test_read_manifest_refuses_names_outside_the_folder(tmp_path: Path, name: str):
    (tmp_path / "outside.bin").write_bytes(b"secret")
    folder = tmp_path / "ckpt"
    _write_manifest_json(folder, {name: {"size_bytes": 6, "hash": "0" * 32}})
    with pytest.raises(CheckpointCorrupt, match="manifest names"):
        read_manifest(folder)
    with pytest.raises(CheckpointCorrupt):
        verify(folder)


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({}, "lists no files"),
        ({"a": {"size_bytes": -1, "hash": "0" * 32}}, "no valid size_bytes"),
        ({"a": {"size_bytes": True, "hash": "0" * 32}}, "no valid size_bytes"),
        ({"a": {"size_bytes": 1, "hash": "abc"}}, "no valid hash"),
        ({"a": [1, 2]}, "not an object"),
        ({MANIFEST_NAME: {"size_bytes": 1, "hash": "0" * 32}}, "lists itself"),
    ],
)
def test_read_manifest_refuses_malformed_entries(tmp_path: Path, files: dict, reason: str):
    _write_manifest_json(tmp_path, files)
    with pytest.raises(CheckpointCorrupt, match=reason):
        read_manifest(tmp_path)


def test_read_manifest_refuses_a_newer_format_with_the_fix(tmp_path: Path):
    final = _commit(tmp_path)
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (final / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedFormat, match="upgrade the package"):
        read_manifest(final)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\xff\xfe", b'{"files": {}}'])
def test_a_broken_manifest_is_not_a_checkpoint(tmp_path: Path, content: bytes):
    final = _commit(tmp_path)
    (final / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(CheckpointCorrupt) as info:
        cheap_check(final)
    assert info.value.path.startswith(str(final))


def test_a_torn_manifest_is_not_a_checkpoint(tmp_path: Path):
    final = _commit(tmp_path)
    raw = (final / MANIFEST_NAME).read_bytes()
    (final / MANIFEST_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointCorrupt, match="not valid JSON"):
        cheap_check(final)


def test_cheap_check_catches_sizes_but_only_verify_catches_a_changed_byte(tmp_path: Path):
    final = _commit(tmp_path)
    path = final / "weights.bin"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(bytes(data))
    assert cheap_check(final)["files"]["weights.bin"]["size_bytes"] == len(data)  # same size: cheap check passes
    with pytest.raises(CheckpointCorrupt, match="does not match its hash") as info:
        verify(final)
    assert info.value.path == str(path)


def test_both_checks_catch_a_truncated_file_and_name_it(tmp_path: Path):
    final = _commit(tmp_path)
    path = final / "weights.bin"
    path.write_bytes(path.read_bytes()[:-1])
    for check in (cheap_check, verify):
        with pytest.raises(CheckpointCorrupt, match="truncated or partial") as info:
            check(final)
        assert info.value.path == str(path)


def test_both_checks_catch_a_missing_file(tmp_path: Path):
    final = _commit(tmp_path)
    (final / "sub" / "extra.txt").unlink()
    for check in (cheap_check, verify):
        with pytest.raises(CheckpointCorrupt, match="missing"):
            check(final)


def test_a_symlinked_member_or_folder_is_refused(tmp_path: Path):
    final = _commit(tmp_path / "a")
    target = tmp_path / "elsewhere.bin"
    os.replace(final / "weights.bin", target)
    os.symlink(target, final / "weights.bin")
    with pytest.raises(CheckpointCorrupt, match="symlink"):
        cheap_check(final)
    good = _commit(tmp_path / "b")
    link = tmp_path / "b" / "step-000002"
    os.symlink(good, link)
    with pytest.raises(CheckpointCorrupt, match="symlink"):
        cheap_check(link)


def test_a_file_not_in_the_manifest_does_not_fail_the_checks(tmp_path: Path):
    final = _commit(tmp_path)
    (final / "notes.txt").write_text("added later")
    verify(final)


def test_checks_return_the_manifest(tmp_path: Path):
    final = _commit(tmp_path, epoch=3)
    assert cheap_check(final) == verify(final) == read_manifest(final)
    assert verify(final)["epoch"] == 3


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000])
def test_read_capped_reads_a_whole_file_or_one_byte_past_the_cap(tmp_path: Path, size: int):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    raw = read_capped(path, 1000)
    assert raw == path.read_bytes()[:1001]  # a caller refuses anything longer than the cap


@pytest.mark.parametrize("size", [0, 10, 999, 1000, 5000])
def test_read_capped_reads_on_past_a_stale_size(tmp_path: Path, size: int):
    """A file that grew after the caller's stat is read to its end (or one byte past the cap)."""
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 8)  # 2048 bytes, more than the size the caller saw
    assert read_capped(path, 1000, size=size) == path.read_bytes()[:1001]
    assert read_capped(path, 4096, size=size) == path.read_bytes()


def test_read_capped_nofollow_refuses_a_symlink(tmp_path: Path):
    (tmp_path / "real").write_bytes(b"{}")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_capped(tmp_path / "link", 1000) == b"{}"
    with pytest.raises(OSError):
        read_capped(tmp_path / "link", 1000, nofollow=True)


def test_subfolders_are_the_real_visible_folders_only(tmp_path: Path):
    for name in ("run-b", "run-a", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "a-file").write_bytes(b"x")
    (tmp_path / "link-to-run").symlink_to(tmp_path / "run-a")  # a link is never taken for a run folder
    assert sorted(p.name for p in subfolders(tmp_path)) == ["run-a", "run-b"]
    assert all(p.parent == tmp_path for p in subfolders(tmp_path))
    assert subfolders(tmp_path / "missing") == []
    assert subfolders(tmp_path / "a-file") == []
