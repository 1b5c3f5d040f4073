"""MLflow tracking for the train and eval stages (and the SageMaker runner, which trains remotely).

Tracking URI ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<repo root>/mlflow.db`` (absolute, so queued
DVC experiments, which run in a temporary copy, log to the same store), artifacts next to the
database in ``mlruns/``, experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``pets``.

One run per training, continued on resume: every param (flattened, ``model.anchors.num_scales``),
tags ``dvc_exp_name`` (``$DVC_EXP_NAME``), ``git_revision`` and ``mlflow.source.git.commit`` (the
repository root's HEAD commit; ``unknown`` outside a git checkout), ``stage``, ``model``, ``dataset``;
metrics per step (sent in batches, so a step is logged once). ``mlflow_run.json`` in the checkpoints
folder names the run, so eval logs into the same one.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detkit.config import repo_root
from detkit.core.fsio import atomic_write_json
from detkit.train.checkpoints import read_json

BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics and 100 params


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` (lists by index), as MLflow params."""
    out: dict[str, str] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        return {prefix[:-1]: str(node)[:6000]}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def git_revision(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """The training's MLflow run: created, or continued when ``resume`` and ``run_file`` names one."""

    def __init__(self, cfg, run_file: Path, *, resume: bool, start_step: int, uri: str | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_tracking_uri()
        self.client = MlflowClient(self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pets")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name, artifact_location=_artifact_root(self.uri)))
        previous = read_json(run_file) if resume else None
        self.run_id = None
        if previous and previous.get("tracking_uri") == self.uri:
            try:
                self.run_id = self.client.get_run(previous["run_id"]).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "resumed_from_step", str(start_step))
            except Exception:  # deleted or from another store: start a new run
                self.run_id = None
        if self.run_id is None:
            exp_name = os.environ.get("DVC_EXP_NAME", "")
            revision = git_revision(repo_root())
            self.run_id = self.client.create_run(experiment_id, run_name=exp_name or None, tags={
                "dvc_exp_name": exp_name, "git_revision": revision, "mlflow.source.git.commit": revision,
                "stage": "train", "model": cfg.model.name, "dataset": cfg.dataset.name,
            }).info.run_id
            params = [Param(k, v) for k, v in sorted(flatten(OmegaConf.to_container(cfg, resolve=True)).items())]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        atomic_write_json(run_file, {"run_id": self.run_id, "experiment_id": experiment_id,
                                     "experiment_name": name, "tracking_uri": self.uri})
        self.pending: list[Any] = []

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def add(self, rows: Iterable[dict[str, Any]], fields: Sequence[str], prefix: str = "") -> None:
        """Queue ``fields`` (after ``step``) of each row as metrics at that row's step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(f"{prefix}{k}", float(row[k]), now, int(row["step"]))
                         for row in rows for k in fields[1:]]

    def flush(self) -> None:
        for i in range(0, len(self.pending), BATCH):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + BATCH])
        self.pending = []

    def finish(self, artifacts: dict[str, Path], metrics: dict[str, float]) -> None:
        self.flush()
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value))
        for name, folder in artifacts.items():
            self.client.log_artifacts(self.run_id, str(folder), name)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # the store itself may be what failed; the stage's own error says more
            pass


def log_to_run(run_file: Path, metrics: dict[str, float], artifacts: Iterable[Path], artifact_path: str,
               prefix: str = "") -> str | None:
    """Add metrics and files to the run that ``run_file`` names; None when there is none."""
    run = read_json(run_file)
    if run is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run["tracking_uri"])
    for name, value in metrics.items():
        client.log_metric(run["run_id"], f"{prefix}{name}", value)
    for path in artifacts:
        client.log_artifact(run["run_id"], str(path), artifact_path)
    return run["run_id"]
