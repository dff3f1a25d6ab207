"""The training library: model, data, loop, checkpoints, recovery, ExperimentDB. No notebook code."""
