"""detkit.eval.coco: COCO metrics with pycocotools semantics, whichever backend computes them."""

from __future__ import annotations

import numpy as np
import pytest

from detkit.eval.coco import STAT_NAMES, ImageResult, evaluate

LABEL_MAP = {1: "Abyssinian", 2: "american_bulldog", 3: "Bengal", 4: "beagle", 5: "pug"}


def random_boxes(rng, n):
    ymin, xmin = rng.uniform(0, 0.6, n), rng.uniform(0, 0.6, n)
    h, w = rng.uniform(0.05, 0.4, n), rng.uniform(0.05, 0.4, n)
    return np.stack([ymin, xmin, ymin + h, xmin + w], axis=1)


def build_results(seed=0, images=60, label_offset=0, perfect=False):
    """Ground truth plus detections: jittered true boxes, some wrong classes, false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for image_id in range(1, images + 1):
        n = int(rng.integers(1, 4))
        gt_boxes = random_boxes(rng, n)
        gt_labels = rng.integers(1, 6, n)
        if perfect:
            boxes, classes, scores = gt_boxes, gt_labels, np.linspace(0.9, 0.8, n)
        else:
            jitter = gt_boxes + rng.normal(0, 0.02, gt_boxes.shape)
            wrong = np.where(rng.uniform(size=n) < 0.2, rng.integers(1, 6, n), gt_labels)
            extra = int(rng.integers(0, 6))
            boxes = np.concatenate([jitter, random_boxes(rng, extra)])
            classes = np.concatenate([wrong, rng.integers(1, 6, extra)])
            scores = rng.uniform(0.05, 1.0, n + extra)
        results.append(ImageResult(image_id, int(rng.integers(200, 640)), int(rng.integers(200, 640)),
                                   gt_boxes, gt_labels, boxes, (classes - 1 + label_offset) % 5 + 1, scores))
    return results


def test_faster_backend_agrees_with_pycocotools_to_1e6():
    results = build_results()
    fast = evaluate(results, LABEL_MAP, backend="faster_coco_eval")
    ref = evaluate(results, LABEL_MAP, backend="pycocotools")
    for name in STAT_NAMES:
        assert fast["metrics"][name] == pytest.approx(ref["metrics"][name], abs=1e-6), name
    assert 0.2 < ref["metrics"]["AP50"] < 0.95  # a mixed set, not a degenerate one
    for name in LABEL_MAP.values():
        assert fast["per_class_ap"][name] == pytest.approx(ref["per_class_ap"][name], abs=1e-6), name
    np.testing.assert_allclose([p["precision"] for p in fast["pr_curve"]],
                               [p["precision"] for p in ref["pr_curve"]], atol=1e-6)


def test_perfect_detections_score_one_and_a_label_offset_scores_zero():
    assert evaluate(build_results(perfect=True), LABEL_MAP)["metrics"]["AP50"] == pytest.approx(1.0)
    shifted = evaluate(build_results(perfect=True, label_offset=1), LABEL_MAP)
    assert shifted["metrics"]["AP50"] < 0.01  # only chance overlaps with another true box


def test_no_detections_at_all_scores_zero_and_absent_class_is_null():
    results = build_results()
    for r in results:
        r.boxes, r.classes, r.scores = np.zeros((0, 4)), np.zeros(0, int), np.zeros(0)
    out = evaluate(results, {**LABEL_MAP, 6: "Sphynx"})
    assert out["metrics"]["AP"] == 0.0
    assert out["per_class_ap"]["Sphynx"] is None
