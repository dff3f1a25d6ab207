"""`recover` and `import utils.training` import no torch: checked in fresh interpreters through sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "pandas", "safetensors")

# Runs the CLI as `python -m utils.training ...` would, then reports which heavy packages it
# imported on stderr's last line (stdout stays the command's own output).
_WRAPPER = """
import json, runpy, sys
sys.argv = ["utils.training", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("utils.training", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TRAINING_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    code = f"HEAVY = {HEAVY!r}\n" + _WRAPPER
    done = _run_python(code, json.dumps(list(args)))
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return done, report


def test_recover_json_in_a_fresh_process_imports_no_torch(trained_workspace: dict[str, Any]) -> None:
    workspace = trained_workspace["workspace"]
    done, report = _cli("recover", "--checkpoint-dir", str(workspace), "--json")
    assert report["code"] in (0, None), done.stderr
    results = json.loads(done.stdout)
    assert Path(results["checkpoint_path"]).name == "step-000010"  # it did the real work
    assert results["metrics_history"]
    assert report["heavy"] == [], f"recover imported {report['heavy']}"


def test_a_failing_recover_still_prints_one_line_without_torch(tmp_path: Path) -> None:
    done, report = _cli("recover", "--checkpoint-dir", str(tmp_path / "missing"))
    assert report["code"] == 1
    assert done.stderr.splitlines()[0].startswith("error: ") and "missing" in done.stderr.splitlines()[0]
    assert report["heavy"] == []


def test_importing_the_package_imports_no_torch_and_task_is_lazy() -> None:
    done = _run_python(
        "import sys, json, utils.training as t\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'pandas'})\n"
        "print(json.dumps({'heavy': heavy, 'dir': 'Task' in dir(t) and 'CheckpointedRun' in dir(t), "
        "'config': t.TrainingConfig.__name__}))\n"
        "try:\n    t.no_such_name\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert json.loads(first) == {"heavy": [], "dir": True, "config": "TrainingConfig"}
    assert "no_such_name" in second
