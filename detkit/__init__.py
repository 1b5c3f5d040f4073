"""Shared building blocks of the pipeline stages in ``stages/``."""
