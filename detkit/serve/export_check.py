"""The export check: the reloaded SavedModel must give the detections eval measured, and the
signatures docs/export.md promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from detkit.data import pipeline
from detkit.serve.signatures import expected_signature, saved_model_cli_show

CHECK_BATCH = 4  # images per call in the export check: bounds its memory whatever export.check_images is


def check_export(path: Path, reference, size: int, score_threshold: float, encoded: list[bytes], tolerance: float,
                 max_detections: int, signatures: list[str]) -> dict[str, Any]:
    """Reloaded SavedModel vs the in-memory model on ``encoded`` images, and its signatures.

    ``reference`` is eval's path (``detkit.models.family.detection_function`` with the export's
    ``max_detections``), so what eval measured is what TF Serving serves. Detections are compared
    per image as sets (``compare_detections``): which of two equal scores comes first is not a
    difference.
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
    parity = compare_detections(expected, got, tolerance, score_threshold)
    shown = {name: saved_model_cli_show(path, name) for name in signatures}
    wanted = {name: expected_signature(max_detections, name) for name in signatures}
    signature_ok = {name: shown[name] == wanted[name] for name in signatures}
    return {
        "passed": parity["mismatched"] == 0 and all(signature_ok.values()),
        "images": len(encoded),
        "tolerance": tolerance,
        **parity,
        "signatures": {name: {"matches_contract": signature_ok[name], "saved_model_cli": shown[name]}
                       for name in signatures},
    }


def compare_detections(expected: dict[str, list], got: dict[str, list], tolerance: float,
                       score_threshold: float) -> dict[str, Any]:
    """Two runs' detections (TF OD API outputs, per image), compared independently of order.

    A detection matches one of the other run with the same class, score and box (each
    coordinate) within ``tolerance``, each used once. One left without a match is a near tie, not
    a difference, only where rounding alone explains it: the other run holds a detection of the
    same class whose score and box are both within ``tolerance`` of it (two near-identical
    candidates, of which NMS kept a different one, already matched to another), or its score is
    within ``tolerance`` of ``score_threshold`` (kept by one run only). Anything else is a mismatch.
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
        fits = same_class & (box_gap <= tolerance) & (score_gap <= tolerance)
        e_free, g_free = np.ones(len(e_scores), bool), np.ones(len(g_scores), bool)
        for a in np.argsort(-e_scores, kind="stable"):
            candidates = np.flatnonzero(fits[a] & g_free)
            if candidates.size:
                b = candidates[np.argmin(box_gap[a, candidates])]
                e_free[a], g_free[b] = False, False
                matched += 1
                largest["detection_boxes"] = max(largest["detection_boxes"], float(box_gap[a, b]))
                largest["detection_scores"] = max(largest["detection_scores"], float(score_gap[a, b]))
        for scores, free, twins in ((e_scores, e_free, fits.any(axis=1)), (g_scores, g_free, fits.any(axis=0))):
            tie = twins | (np.abs(scores - score_threshold) <= tolerance)
            near_ties += int(np.sum(free & tie))
            mismatched += int(np.sum(free & ~tie))
    return {"matched": matched, "near_ties": near_ties, "mismatched": mismatched, "max_abs_difference": largest}
