"""`make demo`: the whole pipeline on the embedded sample in a fresh copy, and the tiny model
really learns (a box-format or label-offset mistake would give an AP50 near 0)."""

from __future__ import annotations

import csv
import json

import pytest

from detkit.labelmap import read_label_map
from tests.repo_copy import run

pytestmark = pytest.mark.slow

MIN_AP50 = 0.5


def test_demo_model_learns_the_sample(demo_repo):
    metrics = json.loads((demo_repo / "metrics" / "eval.json").read_text())
    print(f"demo: AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f} on {metrics['num_images']} val images")
    assert metrics["AP50"] >= MIN_AP50
    assert metrics["step"] == 1000
    per_class = json.loads((demo_repo / "metrics" / "per_class_ap.json").read_text())
    assert set(per_class) == set(read_label_map(demo_repo / "data" / "records" / "label_map.pbtxt").values())


def test_demo_leaves_plots_samples_and_an_experiment(demo_repo):
    with open(demo_repo / "plots" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 1001))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) / 3
    curve = json.loads((demo_repo / "plots" / "pr_curve.json").read_text())
    assert len(curve) == 101 and curve[0]["precision"] >= curve[-1]["precision"]
    samples = sorted((demo_repo / "plots" / "eval_samples").glob("*.png"))
    assert len(samples) == 8
    shown = json.loads(run(["dvc", "exp", "show", "--json"], demo_repo).stdout)
    names = [rev.get("name") for c in shown for e in c.get("experiments") or [] for rev in e.get("revs") or []]
    assert names, "make demo should record a DVC experiment"
    status = run(["dvc", "status"], demo_repo)
    assert "up to date" in status.stdout, status.stdout
