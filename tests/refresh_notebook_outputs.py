"""Re-run training.ipynb in a private, empty working folder and write its fresh outputs back (make notebook-outputs).

The same isolation as tests/run_nbval.sh: runs elsewhere on this machine never reach the committed outputs.
The notebook is written as JupyterLab would leave it after a kernel shutdown, so opening it does not mark
it modified and shows no widget error: no widget state, no execution timestamps, kernelspec
python3 / "Python 3", and each widget output's model id emptied (the front end hides such an output, as
it does for a widget closed while the notebook was open) and its text form, which a viewer without widgets
shows, saying where the bar's final state is (the text line the Training cell prints under it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CLOSED_WIDGET_TEXT = "(a widget: closed; its final state is printed as text below)"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def normalise(nb: nbformat.NotebookNode) -> None:
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is not None:
                view["model_id"] = ""
                output["data"]["text/plain"] = CLOSED_WIDGET_TEXT


def main(notebook: str) -> None:
    path = Path(notebook).resolve()
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_")}
    env.update(TRAINING_WORKSPACE="tmp_training_output", TRAINING_FRESH_START="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.parent), env.get("PYTHONPATH")]))
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    with tempfile.TemporaryDirectory(prefix="training-notebook-") as work:
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=600, store_widget_state=False, resources={"metadata": {"path": work}}
        )
        client.execute()
    normalise(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "training.ipynb")
