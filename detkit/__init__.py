"""Shared building blocks of the pipeline stages in ``stages/``."""

import os

# TensorFlow's C++ layer prints pages of INFO lines on import; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
