"""The Setup cell: detect Colab, offer Google Drive as the workspace, report what the session runs on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ._namespace import COLAB_WORKSPACE, DRIVE_MOUNT, DRIVE_WORKSPACE, text_output


def in_colab() -> bool:
    return "google.colab" in sys.modules


def mount_drive() -> str | None:
    """Mount Google Drive in Colab; the reason it failed, or None on success."""
    try:
        from google.colab import drive  # only importable inside Colab

        drive.mount(DRIVE_MOUNT)
    except Exception as exc:  # declined authorisation, no network, not Colab: all reported, none fatal
        return f"{type(exc).__name__}: {exc}"
    return None


@text_output
def run(ns: dict[str, Any], use_google_drive: bool = True) -> None:
    import torch

    colab = in_colab()
    ns["IN_COLAB"] = colab
    ns["drive_workspace"] = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"✅ utils.training is ready (torch {torch.__version__}, device: {device}).")
    if not colab:
        print("Not running in Colab: runs are kept on this machine; Google Drive is not used.")
    elif not use_google_drive:
        print(f"⚠️ Google Drive not used: the default workspace {COLAB_WORKSPACE} is wiped when Colab recycles")
        print("   the VM. Tick use_google_drive and re-run this cell to keep checkpoints across VMs.")
    else:
        failure = mount_drive()
        if failure is None:
            Path(DRIVE_WORKSPACE).mkdir(parents=True, exist_ok=True)
            ns["drive_workspace"] = DRIVE_WORKSPACE
            print(f"✅ Google Drive mounted: the default workspace is {DRIVE_WORKSPACE} (survives a recycled VM).")
        else:
            print(f"⚠️ Google Drive could not be mounted ({failure}).")
            print(f"   The default workspace is {COLAB_WORKSPACE}, which is wiped when Colab recycles the VM.")
    print("Next: the Parameters cell, then Training; or, after a disconnect, the Recovery cell.")
