"""Tasks that show the Task API on other models: `python -m utils.training train --task examples.digits:build_task`."""
