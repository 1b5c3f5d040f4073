"""Every stage runs alone with overrides in Hydra's grammar: a group switch, nested keys, and a
typo named with its closest key, before any work (run as a user does, in an activated venv)."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import REPO_ROOT
from tests.repo_copy import run


def stage(*args: str) -> subprocess.CompletedProcess:
    return run(["python", "-m", *args], REPO_ROOT, check=False)


def test_a_stage_alone_takes_a_group_switch_and_nested_overrides(sample_raw, tmp_path):
    # params.yaml selects the real Pets dataset; the override switches to the sample for this run only.
    result = stage("stages.tfrecord", "--raw", str(sample_raw), "--out", str(tmp_path / "records"),
                   "dataset=sample", "tfrecord.train_shards=3", "tfrecord.val_shards=1")
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "records" / "stats.json").read_text())
    assert [len(stats["splits"][split]["shards"]) for split in ("train", "val")] == [3, 1]
    assert len(list((tmp_path / "records").glob("train-*-of-00003.tfrecord"))) == 3


def test_a_typo_in_an_override_is_named_with_its_closest_key(tmp_path):
    result = stage("stages.tfrecord", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "records"),
                   "dataset=sample", "tfrecord.train_shrads=3")
    assert result.returncode == 2
    assert "unknown key 'tfrecord.train_shrads' (did you mean 'train_shards'?)" in result.stderr
    assert not (tmp_path / "records").exists()


def test_a_misspelt_group_choice_lists_the_files():
    result = stage("stages.train", "--records", "r", "--checkpoints", "c", "--log", "l", "--val-log", "v",
                   "model=retinanet_tinny")
    assert result.returncode == 2
    assert "(did you mean 'retinanet_tiny'?); choose one of: retinanet_resnet50, retinanet_tiny" in result.stderr
