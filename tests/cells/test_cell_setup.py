"""The Setup cell: Colab detection and the Google Drive offer, outside and (simulated) inside Colab."""

from __future__ import annotations

import sys
import types

from utils.training.cells import setup


def test_outside_colab_it_says_so_and_uses_no_drive(capsys) -> None:
    ns: dict = {}
    setup.run(ns)
    out = capsys.readouterr().out
    assert ns["IN_COLAB"] is False and ns["drive_workspace"] is None
    assert "utils.training is ready" in out and "Not running in Colab" in out


def _fake_colab(monkeypatch, mount) -> None:
    """Stand-in for Colab's `google.colab` package, which exists only on a Colab VM."""
    drive = types.SimpleNamespace(mount=mount)
    colab = types.ModuleType("google.colab")
    colab.drive = drive
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def test_in_colab_a_failed_drive_mount_is_reported_and_falls_back(monkeypatch, capsys) -> None:
    def refuse(path: str) -> None:
        raise ValueError("mount failed: the user declined access")

    _fake_colab(monkeypatch, refuse)
    ns: dict = {}
    setup.run(ns, use_google_drive=True)
    out = capsys.readouterr().out
    assert ns["IN_COLAB"] is True and ns["drive_workspace"] is None
    assert "could not be mounted" in out and "the user declined access" in out and "/content/workspace" in out


def test_in_colab_without_drive_it_warns_that_content_is_wiped(monkeypatch, capsys) -> None:
    calls: list[str] = []
    _fake_colab(monkeypatch, calls.append)
    setup.run({}, use_google_drive=False)
    assert calls == []  # no mount was attempted
    assert "wiped when Colab recycles" in capsys.readouterr().out
