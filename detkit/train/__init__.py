"""Training: checkpoints and resume, strategies and precision (``distribute``), MLflow tracking."""
