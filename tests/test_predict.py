"""`make predict`: the REST request of docs/export.md from the command line, against the served demo model."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from detkit.data.labelmap import read_label_map
from detkit.eval.draw import PREDICTED
from detkit.serve.predict import top_detections
from harness.repo_copy import make
from tests.drawing import changed_elsewhere, outline_share

pytestmark = pytest.mark.slow


def test_make_predict_names_the_pet_and_draws_it(demo_repo, served, val_examples, tmp_path):
    example = val_examples[0]
    image = tmp_path / example["filename"]
    image.write_bytes(example["encoded"])
    result = make(demo_repo, "predict", f"IMAGE={image}", f"URL={served.invocations_url}")
    assert result.returncode == 0, result.stdout + result.stderr
    label_map = read_label_map(demo_repo / "data" / "records" / "label_map.pbtxt")
    first = result.stdout.splitlines()[1].split()
    assert first[0] == label_map[example["labels"][0]], result.stdout  # the class by name, best first
    # The printed boxes are drawn where they are, in the predicted colour, and nothing else is.
    boxes = [[float(v) for v in found] for found in re.findall(
        r"box \(ymin, xmin, ymax, xmax\) ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)$", result.stdout, re.M)]
    assert boxes
    drawn, original = Image.open(tmp_path / f"{image.stem}_detections.png"), Image.open(image)
    assert drawn.size == original.size
    assert [outline_share(drawn, box, [PREDICTED]) for box in boxes] == pytest.approx([1.0] * len(boxes), abs=0.1)
    assert changed_elsewhere(original, drawn, boxes) == 0


def test_make_predict_refuses_a_file_that_is_not_an_image(demo_repo, served, tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8 not really a JPEG")
    result = make(demo_repo, "predict", f"IMAGE={fake}", f"URL={served.invocations_url}")
    assert result.returncode != 0
    assert f"{fake}: not an image file" in result.stderr


def test_make_predict_says_what_the_server_refused(demo_repo, served, tmp_path):
    noise = tmp_path / "noise.png"  # ~9 MB of incompressible pixels: over the 6 MB payload limit
    Image.frombytes("RGB", (2000, 1500), np.random.default_rng(0).bytes(2000 * 1500 * 3)).save(noise)
    result = make(demo_repo, "predict", f"IMAGE={noise}", f"URL={served.invocations_url}")
    assert result.returncode != 0
    assert "HTTP 413: request body larger than 6 MB" in result.stderr


def test_make_predict_without_a_server_names_the_url(demo_repo, val_examples, tmp_path):
    image = tmp_path / "pet.jpg"
    image.write_bytes(val_examples[0]["encoded"])
    result = make(demo_repo, "predict", f"IMAGE={image}", "URL=http://127.0.0.1:9/invocations")
    assert result.returncode != 0
    assert "http://127.0.0.1:9/invocations" in result.stderr


def test_top_detections_keep_order_threshold_and_names():
    prediction = {"num_detections": 3.0, "detection_scores": [0.9, 0.5, 0.2, 0.0],
                  "detection_classes": [2.0, 1.0, 2.0, 0.0],
                  "detection_boxes": [[0, 0, 1, 1], [0, 0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0, 0, 0, 0]]}
    found = top_detections(prediction, {1: "cat", 2: "dog"}, top=5, min_score=0.3)
    assert [(d["class"], d["score"]) for d in found] == [("dog", 0.9), ("cat", 0.5)]
    assert top_detections(prediction, {1: "cat"}, top=1, min_score=0.0)[0]["class"] == "id 2"
