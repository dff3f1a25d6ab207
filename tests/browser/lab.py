"""A private JupyterLab server and a Chromium page driven by Playwright, for the browser test of training.ipynb.

Debian's Chromium (/usr/lib/chromium/chromium, not the /usr/bin wrapper) is used, so Playwright downloads no
browser. The server listens on 127.0.0.1 only, on a free port, with a token, and with its own workspaces and
settings folders (news and update checks off), in a folder of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/lib/chromium/chromium"
STDERR = '[data-mime-type="application/vnd.jupyter.stderr"]'
VISIBLE = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in the current tab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """`jupyter lab` serving `root`, with `env` for its kernels (they inherit the server's environment)."""

    def __init__(self, root: Path, env: dict[str, str], log: Path) -> None:
        self.root, self.port, self.token = root, free_port(), os.urandom(16).hex()
        settings = root.parent / "lab-settings"
        notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True, exist_ok=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True, exist_ok=True)
        tracker.write_text(json.dumps({"windowingMode": "none"}))  # every cell in the page, read as it is
        command = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
            f"--port={self.port}", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
            f"--LabApp.workspaces_dir={root.parent / 'lab-workspaces'}", f"--LabApp.user_settings_dir={settings}",
            "--ServerApp.open_browser=False",
        ]  # fmt: skip
        self.log = log.open("w")
        self.process = subprocess.Popen(command, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                self.api("status")
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"jupyter lab exited; see {log}") from None
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not start in 120 s; see {log}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(f"api/{path}"), timeout=10) as response:
            return json.load(response)

    def kernel_pid(self, notebook: str) -> int:
        """The process id of the kernel of the session of `notebook`."""
        sessions = [s for s in self.api("sessions") if s["path"].endswith(notebook)]
        kernel_id = sessions[0]["kernel"]["id"]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if f"kernel-{kernel_id}.json" in cmdline:
                    return int(entry.name)
        raise RuntimeError(f"no process for kernel {kernel_id}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Notebook:
    """One notebook open in the page: run cells, read outputs, save, close, reopen."""

    def __init__(self, page: Any, lab: LabServer, name: str, shots: Path) -> None:
        self.page, self.lab, self.name, self.shots = page, lab, name, shots

    def open(self) -> None:
        self.page.goto(self.lab.url(f"lab/tree/{self.name}"))
        self.page.wait_for_selector(f"{VISIBLE} .jp-Notebook .jp-Cell", timeout=60_000)
        self.page.wait_for_selector(f"{VISIBLE} .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        self.page.wait_for_timeout(3000)  # the kernel's info reaches the metadata; widget models are looked up

    def cells(self) -> Any:
        return self.page.locator(f"{VISIBLE} .jp-Notebook .jp-Cell")

    def code_cell(self, index: int) -> Any:
        """The index-th code cell (0 = Setup), as in training.ipynb's order."""
        return self.page.locator(f"{VISIBLE} .jp-Notebook .jp-CodeCell").nth(index)

    def wait_idle(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = self.page.locator(f"{VISIBLE} .jp-Notebook .jp-InputPrompt", has_text="[*]").count()
            status = self.page.locator(f"{VISIBLE} .jp-Notebook-ExecutionIndicator[data-status='busy']").count()
            if busy == 0 and status == 0:
                return
            time.sleep(0.5)
        self.screenshot("timeout")
        raise TimeoutError(f"cells still running after {timeout_s} s")

    def run_cell(self, index: int, wait: bool = True) -> None:
        cell = self.code_cell(index)
        cell.locator(".jp-InputPrompt").first.click()
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("Control+Enter")
        if wait:
            self.page.wait_for_timeout(300)
            self.wait_idle()

    def menu(self, top: str, item: str) -> None:
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}")).first.click()

    def accept_dialog(self, button: str) -> None:
        self.page.locator(".jp-Dialog-button", has_text=button).click()

    def run_all(self) -> None:
        self.menu("Run", "Run All Cells")
        self.page.wait_for_timeout(500)
        self.wait_idle()

    def restart_kernel(self) -> None:
        self.menu("Kernel", "Restart Kernel")
        self.accept_dialog("Restart")
        self.page.wait_for_timeout(1500)
        self.wait_idle()

    def output(self, index: int) -> str:
        return self.code_cell(index).locator(".jp-OutputArea").inner_text()

    def save(self) -> None:
        self.page.keyboard.press("Control+s")
        self.page.wait_for_timeout(1000)

    def dirty(self) -> bool:
        return self.page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() > 0

    def shut_down_and_close(self) -> None:
        self.menu("Kernel", "Shut Down Kernel")
        self.page.wait_for_timeout(1000)
        self.menu("File", "Close Tab")
        self.page.wait_for_timeout(500)

    def problems(self) -> list[str]:
        """stderr or traceback outputs and widget errors on the page."""
        found = [f"stderr output: {t[:300]}" for t in self.page.locator(f"{VISIBLE} {STDERR}").all_inner_texts()]
        cells = self.page.locator(f"{VISIBLE} .jp-Notebook .jp-CodeCell")
        for index, text in enumerate(cells.all_inner_texts()):
            for marker in ("Error displaying widget", "Traceback (most recent call last)"):
                if marker in text:
                    found.append(f"code cell {index}: {marker}")
        return found

    def screenshot(self, name: str, cell: int | None = None) -> None:
        """The page, scrolled to the `cell`-th code cell when one is given."""
        if cell is not None:
            self.code_cell(cell).scroll_into_view_if_needed()
        self.page.screenshot(path=str(self.shots / f"{name}.png"))
