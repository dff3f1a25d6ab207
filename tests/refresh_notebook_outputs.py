"""Re-run training.ipynb in a private, empty working folder and write its fresh outputs back (make notebook-outputs).

The same isolation as tests/run_nbval.sh: runs elsewhere on this machine never reach the committed outputs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat


def main(notebook: str) -> None:
    path = Path(notebook).resolve()
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_")}
    env.update(TRAINING_WORKSPACE="tmp_training_output", TRAINING_FRESH_START="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.parent), env.get("PYTHONPATH")]))
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    with tempfile.TemporaryDirectory(prefix="training-notebook-") as work:
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": work}})
        client.execute()
    nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "training.ipynb")
