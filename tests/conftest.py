"""Shared fixtures: the real composed config, shrunk for tests, and the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from detkit.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stages resolve params.yaml and conf/ from DVC_ROOT, as under `dvc repro`.
os.environ["DVC_ROOT"] = str(REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def cfg() -> DictConfig:
    """The real params.yaml + conf/ groups, on the embedded sample dataset."""
    return load_config(overrides=["dataset=sample"])


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> Path:
    """The embedded sample, downloaded (from its committed archives) and extracted."""
    from stages import download

    root = tmp_path_factory.mktemp("sample")
    download.run(load_config(overrides=["dataset=sample"]), {"cache": root / "cache"}, {"raw": root / "raw"})
    return root / "raw"


@pytest.fixture(scope="session")
def sample_records(sample_raw) -> Path:
    """TFRecords of the embedded sample, as the tfrecord stage writes them."""
    from stages import tfrecord

    out = sample_raw.parent / "records"
    tfrecord.run(load_config(overrides=["dataset=sample"]), {"raw": sample_raw}, {"records": out})
    return out
