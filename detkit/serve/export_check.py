"""The export check: the reloaded SavedModel must give the detections eval measured, and the
signatures docs/export.md promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from keras.utils import bounding_boxes

from detkit.data import pipeline
from detkit.serve.signatures import expected_signature, saved_model_cli_show

CHECK_BATCH = 4  # images per call in the export check: bounds its memory whatever export.check_images is
# Rounding explains a near tie only where two candidates' scores, or a score and the threshold,
# agree to about 1e-7: a few detections in a check of hundreds. A systematic change (every box
# moved, another resize) turns most detections into near ties, each of which alone looks like a
# swap; a larger share than this, of both runs' detections together, fails the check.
MAX_NEAR_TIE_SHARE = 0.05


# pragma: no mutate start (the SavedModel and the model run: make test's slow tests check them)
def check_export(path: Path, reference, size: int, detection: dict[str, Any], encoded: list[bytes], tolerance: float,
                 max_detections: int, signatures: list[str]) -> dict[str, Any]:
    """Reloaded SavedModel vs the in-memory model on ``encoded`` images, and its signatures.

    ``reference`` is eval's path (``detkit.models.family.detection_function`` with the export's
    ``max_detections``), so what eval measured is what TF Serving serves; ``detection`` is the
    model file's ``detection`` section. Detections are compared per image as sets
    (``compare_detections``): which of two equal scores comes first is not a difference.
    """
    reloaded = tf.saved_model.load(str(path)).signatures["serving_default"]
    expected: dict[str, list] = {}
    got: dict[str, list] = {}
    for i in range(0, len(encoded), CHECK_BATCH):
        chunk = encoded[i:i + CHECK_BATCH]
        for out, result in ((expected, reference(tf.stack([pipeline.decode_and_resize(e, size) for e in chunk]))),
                            (got, reloaded(inputs=tf.constant(chunk)))):
            for key, value in result.items():
                out.setdefault(key, []).extend(value.numpy())
    # A family that decodes without NMS (top-k) has no swaps to excuse: an IoU of 1 only pairs equal boxes.
    compared = compare_detections(expected, got, tolerance, float(detection["score_threshold"]),
                                  float(detection.get("iou_threshold", 1.0)))
    every_signature = saved_model_cli_show(path)
    shown = {name: every_signature.get(name) for name in signatures}
    wanted = {name: expected_signature(max_detections, name) for name in signatures}
    signature_ok = {name: shown[name] == wanted[name] for name in signatures}
    return {
        "passed": parity(compared) and all(signature_ok.values()),
        "images": len(encoded),
        "tolerance": tolerance,
        **compared,
        "max_near_tie_share": MAX_NEAR_TIE_SHARE,
        "signatures": {name: {"matches_contract": signature_ok[name], "saved_model_cli": shown[name]}
                       for name in signatures},
    }


# pragma: no mutate end
def parity(compared: dict[str, Any]) -> bool:
    """Whether ``compare_detections``' result says the two runs agree: no mismatch, and near ties
    no more than ``MAX_NEAR_TIE_SHARE`` of the detections."""
    return compared["mismatched"] == 0 and compared["near_tie_share"] <= MAX_NEAR_TIE_SHARE


def compare_detections(expected: dict[str, list], got: dict[str, list], tolerance: float, score_threshold: float,
                       iou_threshold: float) -> dict[str, Any]:
    """Two runs' detections (TF OD API outputs, per image), compared independently of order.

    A detection matches one of the other run with the same class, score and box (each
    coordinate) within ``tolerance``, each used once. One left without a match is a near tie,
    not a difference, only where rounding alone explains it:

    - a swap: NMS kept the other of two overlapping candidates whose scores rounding could
      order either way. It pairs, one to one, with a detection of the other run also left
      without a match, of the same class, with a score within ``tolerance`` and an IoU of at
      least ``iou_threshold`` (the overlap at which NMS keeps only one of two);
    - or its score is within ``tolerance`` of ``score_threshold`` (one run kept it, the other not).

    Anything else is a mismatch. ``near_tie_share`` is the near ties' share of both runs'
    detections, which ``parity`` bounds.
    """
    matched = near_ties = mismatched = 0
    largest = {"detection_boxes": 0.0, "detection_scores": 0.0}
    for i in range(len(expected["num_detections"])):
        (e_boxes, e_scores, e_classes), (g_boxes, g_scores, g_classes) = (
            (np.asarray(run["detection_boxes"][i][:n]), np.asarray(run["detection_scores"][i][:n]),
             np.asarray(run["detection_classes"][i][:n]))
            for run in (expected, got) for n in [int(run["num_detections"][i])])
        same_class = e_classes[:, None] == g_classes[None, :]
        box_gap = np.abs(e_boxes[:, None, :] - g_boxes[None, :, :]).max(axis=-1, initial=0.0)
        score_gap = np.abs(e_scores[:, None] - g_scores[None, :])
        close_scores = same_class & (score_gap <= tolerance)
        overlap = np.asarray(bounding_boxes.compute_iou(e_boxes, g_boxes, "yxyx"))
        e_free, g_free = np.ones(len(e_scores), bool), np.ones(len(g_scores), bool)
        order = np.argsort(-e_scores, kind="stable")
        for a, b in pair(close_scores & (box_gap <= tolerance), order, box_gap, e_free, g_free):
            matched += 1
            largest["detection_boxes"] = max(largest["detection_boxes"], float(box_gap[a, b]))
            largest["detection_scores"] = max(largest["detection_scores"], float(score_gap[a, b]))
        near_ties += 2 * len(pair(close_scores & (overlap >= iou_threshold), order, box_gap, e_free, g_free))
        for scores, free in ((e_scores, e_free), (g_scores, g_free)):
            at_threshold = np.abs(scores - score_threshold) <= tolerance
            near_ties += int(np.sum(free & at_threshold))
            mismatched += int(np.sum(free & ~at_threshold))
    detections = 2 * matched + near_ties + mismatched
    return {"matched": matched, "near_ties": near_ties, "mismatched": mismatched,
            "near_tie_share": near_ties / detections if detections else 0.0, "max_abs_difference": largest}


def pair(allowed: np.ndarray, order: np.ndarray, gap: np.ndarray, e_free: np.ndarray,
         g_free: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one pairs of free detections where ``allowed`` [E, G]: each expected one in ``order``
    takes the free one of the other run with the smallest ``gap``; both stop being free."""
    pairs = []
    for a in order:
        candidates = np.flatnonzero(allowed[a] & g_free) if e_free[a] else []
        if len(candidates):
            b = int(candidates[np.argmin(gap[a, candidates])])
            e_free[a], g_free[b] = False, False
            pairs.append((int(a), b))
    return pairs
