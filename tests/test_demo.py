"""`make demo`: the whole pipeline on the embedded sample in a fresh copy, and the tiny model
really learns (a box-format or label-offset mistake would give an AP50 near 0)."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from detkit.data.labelmap import read_label_map
from detkit.data.pipeline import encoded_images
from detkit.eval.draw import PREDICTED, TRUE
from harness.repo_copy import activated_env, run
from tests.drawing import outline_share

# TensorFlow's C++ start-up lines: absl's pre-init notice and C++ log records (severity, date, time,
# thread, file:line]), e.g. CUDA probes on CPU machines, oneDNN and CPU-instruction notices; anywhere in a
# line, as a run-time record lands right after a progress bar's frame.
TF_STARTUP = re.compile(r"absl::InitializeLog|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]")

pytestmark = pytest.mark.slow

MIN_AP50 = 0.9  # it reaches about 0.96 (README): a box-format or label-offset mistake gives near 0


def test_demo_model_learns_the_sample(demo_repo):
    metrics = json.loads((demo_repo / "metrics" / "eval.json").read_text())
    print(f"demo: AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f} on {metrics['num_images']} val images")
    assert metrics["AP50"] >= MIN_AP50
    assert metrics["step"] == 750
    per_class = json.loads((demo_repo / "metrics" / "per_class_ap.json").read_text())
    assert set(per_class) == set(read_label_map(demo_repo / "data" / "records" / "label_map.pbtxt").values())


def test_demo_leaves_plots_samples_and_an_experiment(demo_repo, val_examples):
    with open(demo_repo / "plots" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(10, 751, 10))  # train.log_every
    with open(demo_repo / "plots" / "val_log.csv") as f:
        val = list(csv.DictReader(f))
    assert [int(r["step"]) for r in val] == [250, 500, 750]  # train.eval_every
    assert float(val[-1]["AP50"]) > float(val[0]["AP50"])
    plots = json.loads(run(["dvc", "plots", "show", "--json"], demo_repo).stdout)["data"]
    drawn = plots["val AP50 during training"][0]["content"]["data"]["values"]
    assert [(int(p["step"]), float(p["dvc_inferred_y_value"])) for p in drawn if p["field"] == "AP50"] == [
        (int(r["step"]), float(r["AP50"])) for r in val]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) / 3
    curve = json.loads((demo_repo / "plots" / "pr_curve.json").read_text())
    assert len(curve) == 101 and curve[0]["precision"] >= curve[-1]["precision"]
    samples = sorted((demo_repo / "plots" / "eval_samples").glob("*.png"))
    assert len(samples) == 8
    evaluated = encoded_images(demo_repo / "data" / "records", "val", len(val_examples))  # in eval's order
    for sample in samples:  # val_<image id>.png, ids counted from 1 in that order
        encoded = evaluated[int(sample.stem.split("_")[1]) - 1]
        drawn, example = Image.open(sample), next(e for e in val_examples if e["encoded"] == encoded)
        assert drawn.size == Image.open(io.BytesIO(encoded)).size
        for box in example["boxes"]:
            # The true box in green where it is, drawn over the predictions (a good one would hide it)...
            assert outline_share(drawn, box, [TRUE]) >= 0.9, sample
            # ...and the model's red box around it.
            assert predicted_near(drawn, box), sample
    shown = json.loads(run(["dvc", "exp", "show", "--json"], demo_repo).stdout)
    names = [rev.get("name") for c in shown for e in c.get("experiments") or [] for rev in e.get("revs") or []]
    assert names, "make demo should record a DVC experiment"
    status = run(["dvc", "status"], demo_repo)
    assert "up to date" in status.stdout, status.stdout


def predicted_near(drawn: Image.Image, box) -> bool:
    """Whether the predicted colour is drawn within a quarter of ``box``'s size around it."""
    a = np.asarray(drawn.convert("RGB"))
    height, width = a.shape[:2]
    ymin, xmin, ymax, xmax = box
    dy, dx = (ymax - ymin) / 4, (xmax - xmin) / 4
    region = a[max(int((ymin - dy) * height), 0):int((ymax + dy) * height) + 1,
               max(int((xmin - dx) * width), 0):int((xmax + dx) * width) + 1]
    return bool(np.all(region == PREDICTED, axis=-1).any())


def test_demo_console_is_the_stages_own_lines(demo_run):
    _, result = demo_run
    output = result.stdout + result.stderr
    for line in ("download: wrote", "tfrecord: wrote", "train: 750 steps", "eval: ", "export: wrote", "demo done"):
        assert line in output, line
    assert not TF_STARTUP.search(output), TF_STARTUP.search(output).group(0)
    # Warnings a user cannot act on are fixed at their cause, not hidden.
    for noise in ("Gradients do not exist", "was passed, but will be ignored", "INFO mlflow"):
        assert noise not in output, noise


def test_detkit_tf_logs_brings_tensorflows_lines_back(demo_repo, tmp_path):
    """The quiet console is a filter a user can turn off: the same program (batch inference on one image,
    TensorFlow imported and its model run) prints TensorFlow's own lines with DETKIT_TF_LOGS=1."""
    images = tmp_path / "images"
    images.mkdir()
    one = next((demo_repo / "data" / "raw" / "images").glob("*.jpg"))
    (images / one.name).write_bytes(one.read_bytes())
    results = {}
    for name, extra in (("quiet", {}), ("loud", {"DETKIT_TF_LOGS": "1"})):
        results[name] = subprocess.run(
            ["python", "-m", "detkit.serve.batch", str(images), str(tmp_path / name), "--export",
             "models/export/pet_object_detection"], cwd=demo_repo, env=activated_env(**extra), capture_output=True,
            text=True)
    quiet, loud = results["quiet"], results["loud"]
    assert quiet.returncode == loud.returncode == 0, loud.stderr
    assert not TF_STARTUP.search(quiet.stderr), quiet.stderr
    assert TF_STARTUP.search(loud.stderr), loud.stderr
    assert all((tmp_path / name / f"{one.name}.json").is_file() for name in results)
