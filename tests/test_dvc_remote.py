"""Sharing results through an S3 remote (moto's server on 127.0.0.1): `dvc push` of the demo's
outputs and `dvc pull` in a fresh clone restore every output byte for byte, `dvc exp push` /
`dvc exp pull` carry an experiment to that clone; queued experiments (`dvc exp run --queue`,
`dvc queue start`) land in `dvc exp show` and in the workspace's MLflow store, one run each,
trained with their own params."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import boto3
import pytest
from ruamel.yaml import YAML

from harness.repo_copy import run
from tests.moto_server import moto_server
from tests.test_dvc_pipeline import quick_copy

pytestmark = pytest.mark.slow

BUCKET = "pets-dvc"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 on 127.0.0.1; DVC finds the credentials in the environment, as boto3 does."""
    with moto_server({"AWS_DEFAULT_REGION": REGION}, unset=("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
                     endpoint_env=False) as url:
        boto3.client("s3", endpoint_url=url, region_name=REGION).create_bucket(Bucket=BUCKET)
        yield url


def lock_outs(root: Path) -> list[str]:
    """Every output path that dvc.lock records, over all stages."""
    lock = YAML(typ="safe").load((root / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


def digests(root: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every file under each output, by path relative to ``root``."""
    found = {}
    for out in outs:
        path = root / out
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def test_push_then_pull_in_a_fresh_clone_restores_every_output(demo_repo, s3_endpoint, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(demo_repo, repo, symlinks=True)  # the shared demo stays as other tests expect it
    outs = lock_outs(repo)
    assert {"data/records", "models/checkpoints", "models/export", "build/serving", "build/model.tar.gz",
            "metrics/eval.json"} <= set(outs), outs
    expected = digests(repo, outs)

    run(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/pets"], repo)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint], repo)
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "demo results, S3 remote"], repo)
    run(["git", "push", "-q", "origin", "HEAD"], repo)
    pushed = run(["dvc", "push"], repo)
    assert "pushed" in pushed.stdout, pushed.stdout

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "models").exists() and not (clone / "data").exists()
    run(["dvc", "pull"], clone)
    assert digests(clone, outs) == expected
    assert "up to date" in run(["dvc", "status"], clone).stdout

    # An experiment run after the remote was committed (DVC reads the remote from the experiment's own
    # commit): its new outputs go up with `dvc exp push` and come down with `dvc exp pull`.
    run(["dvc", "exp", "run", "-n", "fewer-boxes", "-S", "export.max_detections=50"], repo)
    experiment = digests(repo, outs)
    assert experiment["build/model.tar.gz"] != expected["build/model.tar.gz"]
    sent = run(["dvc", "exp", "push", "origin", "fewer-boxes"], repo)
    assert "uploaded" in sent.stdout, sent.stdout
    run(["dvc", "exp", "pull", "origin", "fewer-boxes"], clone)
    run(["dvc", "exp", "apply", "fewer-boxes"], clone)
    assert digests(clone, outs) == experiment


def queue_finished(root: Path, timeout_s: float) -> str:
    """`dvc queue status` once no task is queued or running; the last table it printed."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(["dvc", "queue", "status"], root).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout_s:.0f} s:\n{status}"
        time.sleep(5)


def test_queued_experiments_land_in_dvc_exp_show_and_the_workspace_mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient

    repo = quick_copy(tmp_path)
    rates = {"lr-high": 0.004, "lr-low": 0.0005}
    for name, rate in rates.items():
        run(["dvc", "exp", "run", "--queue", "--name", name, "-S", f"train.learning_rate={rate}"], repo)
    run(["dvc", "queue", "start", "-j", "1"], repo)
    try:
        status = queue_finished(repo, timeout_s=480)
    finally:
        run(["dvc", "queue", "stop"], repo, check=False)
    for name in rates:
        assert re.search(rf"\b{name}\b.*\bSuccess\b", status), \
            status + run(["dvc", "queue", "logs", name], repo, check=False).stdout[-4000:]
    assert not (repo / "data").exists() and not (repo / "models").exists()  # each ran in its own copy

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    experiments = {rev.get("name") or rev["data"].get("name"): rev["data"]
                   for commit in shown for exp in commit.get("experiments") or [] for rev in exp.get("revs") or []}
    assert set(rates) <= set(experiments), list(experiments)

    # The runs are in the workspace's store, not in the executors' temporary copies under .dvc/tmp.
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("pets").experiment_id
    for name, rate in rates.items():
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == rate
        runs = client.search_runs([experiment_id], filter_string=f"tags.dvc_exp_name = '{name}'")
        assert len(runs) == 1, (name, [r.info.run_id for r in runs])
        (mlflow_run,) = runs
        assert mlflow_run.data.metrics["eval/AP50"] == pytest.approx(
            data["metrics"]["metrics/eval.json"]["data"]["AP50"], abs=1e-9), name
        assert float(mlflow_run.data.params["train.learning_rate"]) == rate, name  # trained with its own params
