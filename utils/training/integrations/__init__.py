"""Opt-in integrations: Hugging Face Trainer and Lightning checkpoint seals, TensorBoard logging, MLflow export."""
