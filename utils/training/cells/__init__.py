"""The notebook's cells as functions: each takes the namespace (`ns`, the notebook's globals()) and keywords.

One module per cell of training.ipynb: setup, parameters, model_task (the Model cell), training, recovery, dashboard,
diagnostic, best_model, csv_export, inference. Every cell checks the names it needs first
(`_namespace.check`): a missing variable or an expected condition is printed with the cell
to run next, never raised. Cells print for a person; the work itself lives in the engine
and in `utils.training.analysis`.
"""
