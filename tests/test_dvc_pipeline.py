"""dvc.yaml: the stages run under `dvc repro`, and re-run exactly when their inputs change."""

from __future__ import annotations

import re

import pytest

from tests.repo_copy import make_repo_copy, run

pytestmark = pytest.mark.slow


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = make_repo_copy(tmp_path_factory.mktemp("repo"))
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("dataset: oxford_pets", "dataset: sample"))
    return root


def test_repro_runs_data_stages_then_nothing_then_only_what_changed(repo):
    first = run(["dvc", "repro", "tfrecord"], repo)
    assert ran(first.stdout) == ["download", "tfrecord"], first.stdout
    assert (repo / "data" / "records" / "stats.json").is_file()
    assert sorted(p.name for p in (repo / "data" / "raw").iterdir()) == ["annotations", "images"]

    second = run(["dvc", "repro", "tfrecord"], repo)
    assert ran(second.stdout) == [], second.stdout

    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("seed: 42", "seed: 7"))
    third = run(["dvc", "repro", "tfrecord"], repo)
    assert ran(third.stdout) == ["tfrecord"], third.stdout
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout, status.stdout
