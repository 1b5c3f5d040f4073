"""Sharing results through an S3 remote (moto's server on 127.0.0.1): `dvc push` of the demo's
outputs and `dvc pull` in a fresh clone restore every output byte for byte, `dvc exp push` /
`dvc exp pull` carry an experiment to that clone. (Queued experiments: test_dvc_pipeline.py.)"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import boto3
import pytest
from ruamel.yaml import YAML

from harness.repo_copy import run
from tests.moto_server import moto_server

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
