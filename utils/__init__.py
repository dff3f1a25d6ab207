"""Project utilities; the training library lives in utils.training."""
