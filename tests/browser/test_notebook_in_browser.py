"""training.ipynb in JupyterLab and a real Chromium, as a user runs it (`make test-browser`, not part of `make test`).

Scenarios, in one Lab server on copies of the notebook (autosave writes outputs into the open file):
Run All, then save + kernel shutdown + reopen with no widget error and no "modified" mark; a kernel restart
then Setup, Parameters, Recovery and the analysis cells; the run picker choosing each run; Training after
the picker; Recovery with no Parameters run; SIGKILL of the kernel mid-training, then Recovery and Training
resuming. After each: no stderr or traceback output, no widget error, no browser console error, and the
run names shown. Screenshots go to tests/browser/output/ (BROWSER_TEST_OUTPUT to choose another folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from .lab import CHROMIUM, LabServer, Notebook

REPO = Path(__file__).resolve().parents[2]
OUTPUT = Path(os.environ.get("BROWSER_TEST_OUTPUT") or REPO / "tests" / "browser" / "output")
SETUP, PARAMETERS, MODEL, TRAINING, RECOVERY, DASHBOARD, DIAGNOSTIC = range(7)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: run `make test-browser`")


def notebook_copy(folder: Path, name: str, **form: object) -> str:
    """A copy of training.ipynb with these form values (in whichever cell has the field)."""
    nb = nbformat.read(REPO / "training.ipynb", as_version=4)
    for cell, (key, value) in ((c, f) for c in nb.cells if c.cell_type == "code" for f in form.items()):
        literal = json.dumps(value) if isinstance(value, str) else repr(value)  # "alpha", True, 0.01
        cell.source = re.sub(rf"^{key} = .*?(  # @param)", lambda m, k=key, v=literal: f"{k} = {v}{m.group(1)}",
                             cell.source, flags=re.M)  # fmt: skip
    nbformat.write(nb, folder / name)
    return name


def cli_train(workspace: Path, run_name: str, seed: int, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "utils.training", "train", "--preset", "tiny", "--epochs", "1", "--seed", str(seed),
         "--workspace", str(workspace), "--run-name", run_name, "--save-every-seconds", "0"],
        check=True, capture_output=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    shots = OUTPUT
    if shots.exists():
        shutil.rmtree(shots)
    shots.mkdir(parents=True)
    base = tmp_path_factory.mktemp("browser")
    root = base / "notebooks"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_")}
    env.update(PYTHONPATH=str(REPO), TRAINING_WORKSPACE=str(root / "ws"), TRAINING_PRESET="tiny")
    env["JUPYTER_CONFIG_DIR"] = str(base / "jupyter-config")
    cli_train(root / "training_output", "stale", 1, env)  # an old run in ./training_output
    (root / "ws" / "checkpoints" / "kill_early").mkdir(parents=True)  # killed before its first checkpoint
    (root / "ws" / "checkpoints" / "kill_early" / "run.json").write_text('{"run_name": "kill_early"}')
    lab = LabServer(root, env, shots / "jupyter-lab.log")
    console_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console_errors.append(str(e)))
        try:
            yield {"page": page, "lab": lab, "root": root, "shots": shots, "env": env, "console": console_errors}
        finally:
            browser.close()
            lab.stop()


def assert_clean(nb: Notebook, console: list[str], shot: str, cell: int | None = None) -> None:
    nb.screenshot(shot, cell)
    assert nb.problems() == [], f"{shot}: {nb.problems()}"
    assert console == [], f"{shot}: browser console errors: {console}"


def test_the_notebook_as_a_user_runs_it(session) -> None:  # noqa: PLR0915 - one story, in order
    page, lab, root, shots, console = (session[k] for k in ("page", "lab", "root", "shots", "console"))
    started = time.monotonic()
    nb = Notebook(page, lab, notebook_copy(root, "alpha.ipynb", run_name="alpha", show_run_picker=True), shots)

    # The committed notebook opens unmodified, with no widget error (problem 7).
    nb.open()
    assert not nb.dirty(), "opening the notebook marked it modified"
    assert_clean(nb, console, "01-opened")

    # Run All: the trained model is kept by Recovery straight after Training, nothing recorded (problem 5).
    nb.run_all()
    assert "✅ Run 'alpha'" in nb.output(TRAINING)
    # The finished bar stays as text, with the last validation loss on it (problems 6, 7).
    assert re.search(r"alpha · val/loss \d+\.\d+: 100%\|█+\| 40/40", nb.output(TRAINING)), "no finished bar as text"
    assert "Recovered run 'alpha'" in nb.output(RECOVERY) and "nothing recorded" in nb.output(RECOVERY)
    assert "✅ model" in nb.output(DIAGNOSTIC)
    assert_clean(nb, console, "02-run-all", TRAINING)

    # Save, shut the kernel down, reopen: readable outputs, no widget error (problem 7).
    nb.save()
    assert not nb.dirty()
    nb.shut_down_and_close()
    nb.open()
    assert re.search(r"alpha · val/loss \d+\.\d+: 100%", nb.output(TRAINING))
    assert_clean(nb, console, "03-saved-and-reopened", RECOVERY)

    # A newer run appears (problem 2): after a restart, Parameters' run alpha is recovered, not beta.
    cli_train(root / "ws", "beta", 3, session["env"])
    nb.restart_kernel()
    for index in (SETUP, PARAMETERS, RECOVERY):
        nb.run_cell(index)
    assert "Recovered run 'alpha'" in nb.output(RECOVERY) and "recorded this session" in nb.output(RECOVERY)
    assert_clean(nb, console, "04-restart-setup-recovery", RECOVERY)

    # The picker: every run in Recovery's order, exactly the chosen one recovered, outputs replaced (problem 1).
    picker = nb.code_cell(RECOVERY).locator("select")
    names = [re.split(r"\s", o)[0] for o in picker.locator("option").all_inner_texts()]
    assert names[:2] == ["alpha", "beta"] or names[:2] == ["beta", "alpha"], names
    assert set(names) == {"alpha", "beta", "kill_early", "stale"}, names
    for name in names:
        picker.select_option(label=next(o for o in picker.locator("option").all_inner_texts() if o.startswith(name)))
        nb.code_cell(RECOVERY).locator("button", has_text="Recover this run").click()
        expected = "no complete checkpoint there" if name == "kill_early" else f"✅ Recovered run '{name}'"
        page.wait_for_function(
            "([i, t]) => document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')[i]"
            ".innerText.includes(t)", arg=[RECOVERY, expected], timeout=30_000,
        )  # fmt: skip
        text = nb.output(RECOVERY)
        assert text.count("Recovered run") + text.count("Nothing to recover") == 1, text
        nb.screenshot(f"05-picker-{name}", RECOVERY)
    assert_clean(nb, console, "05-picker")

    # Training after the picker's recovery continues that run with its own config (problem 3).
    picker.select_option(label=next(o for o in picker.locator("option").all_inner_texts() if o.startswith("beta")))
    nb.code_cell(RECOVERY).locator("button", has_text="Recover this run").click()
    page.wait_for_timeout(1500)
    nb.run_cell(TRAINING)
    assert "Continuing the recovered run 'beta'" in nb.output(TRAINING) and "does not match" not in nb.output(TRAINING)
    assert "picker closed when another cell ran" in nb.output(RECOVERY)
    assert_clean(nb, console, "06-training-after-picker", TRAINING)
    for index in (DASHBOARD, DIAGNOSTIC):
        nb.run_cell(index)
    assert "Dashboard of run 'beta'" in nb.output(DASHBOARD) and "❌" not in nb.output(DIAGNOSTIC)
    assert_clean(nb, console, "06-analysis", DASHBOARD)

    # No Parameters run: the newest across every location, not the old run in ./training_output (problem 4).
    nb.restart_kernel()
    nb.run_cell(SETUP)
    nb.run_cell(RECOVERY)
    assert "Recovered run 'beta'" in nb.output(RECOVERY), nb.output(RECOVERY)
    nb.run_cell(DIAGNOSTIC)  # another cell ran: the picker is now text, so the saved notebook holds no widget
    assert "picker closed when another cell ran" in nb.output(RECOVERY)
    assert_clean(nb, console, "07-newest-across-locations", RECOVERY)
    nb.save()
    nb.shut_down_and_close()

    # SIGKILL of the kernel mid-training, then Recovery and Training resume (problem 6: it talks while training).
    long = Notebook(page, lab, notebook_copy(root, "long.ipynb", run_name="long", epochs=3, save_every_minutes=0.01),
                    shots)  # fmt: skip
    long.open()
    for index in (SETUP, PARAMETERS, MODEL):
        long.run_cell(index)
    long.run_cell(TRAINING, wait=False)
    run_dir = root / "ws" / "checkpoints" / "long"
    deadline = time.monotonic() + 180
    while not list(run_dir.glob("step-*/MANIFEST.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(run_dir.glob("step-*/MANIFEST.json")), "no checkpoint before the kill"
    # Live output: the trainer's events (utils.training.events) reach the cell before the kill.
    page.wait_for_function(
        "([i]) => /checkpoint|epoch 1\\//.test(document.querySelectorAll("
        "'.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')[i].innerText)", arg=[TRAINING], timeout=60_000,
    )  # fmt: skip
    long.screenshot("08-training-before-the-kill", TRAINING)
    os.kill(lab.kernel_pid("long.ipynb"), signal.SIGKILL)
    page.locator(".jp-Dialog-button", has_text="Ok").click(timeout=60_000)
    console.clear()  # the dead kernel's closed websocket is logged; that is the scenario, not a failure
    long.wait_idle()
    long.run_cell(SETUP)
    long.run_cell(RECOVERY)
    assert "Recovered run 'long'" in long.output(RECOVERY) and "not finished" in long.output(RECOVERY)
    long.run_cell(TRAINING)
    assert "resumed from" in long.output(TRAINING) and "✅ Run 'long'" in long.output(TRAINING)
    assert "completed, 3 epoch(s)" in long.output(TRAINING)
    assert_clean(long, console, "09-killed-recovered-resumed", TRAINING)
    long.save()
    long.shut_down_and_close()
    long.open()
    assert_clean(long, console, "10-long-reopened", TRAINING)
    (shots / "timing.txt").write_text(f"browser scenarios: {time.monotonic() - started:.0f} s\n")
