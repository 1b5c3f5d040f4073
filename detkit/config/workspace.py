"""Where a run reads its params and writes its outputs, and where shared state lives."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The user's repository, where shared state lives (the MLflow store): DVC exports DVC_ROOT to
    stage commands, and for queued and --temp experiments points it at this repository, not at the
    executor's copy the stage runs in; otherwise the cwd."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def workspace_root() -> Path:
    """The tree a stage reads params.yaml and conf/ from and writes its outputs in. DVC starts each
    stage command (DVC_STAGE set) in dvc.yaml's folder: the workspace, or a queued or --temp
    experiment's copy under .dvc/tmp/exps; outside DVC, ``repo_root()``."""
    return Path.cwd().resolve() if "DVC_STAGE" in os.environ else repo_root()

