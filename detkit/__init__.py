"""Shared building blocks of the pipeline stages in ``stages/``."""

from detkit import tflog

tflog.install()
