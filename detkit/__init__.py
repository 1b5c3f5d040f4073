"""Shared building blocks of the pipeline stages in ``stages/``."""

import os

from detkit.core import lean_keras, tflog

tflog.install()
lean_keras.install()
# MLflow logs its database set-up and migrations at INFO on first use: nothing a user acts on.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
