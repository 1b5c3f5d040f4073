"""The export check (detkit.serve.export_check): detections compared as sets, near ties that only
rounding explains, their bounded share, and the check on the demo's export."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from detkit.data.images import ImageLimits
from detkit.models import family
from detkit.models.retinanet import DetectionDecoder
from detkit.serve import export_check, signatures
from detkit.train.checkpoints import FINAL

TOLERANCE, SCORE_THRESHOLD, IOU_THRESHOLD = 1e-3, 0.05, 0.5


def compare(expected, got, tolerance=TOLERANCE):
    return export_check.compare_detections(expected, got, tolerance, SCORE_THRESHOLD, IOU_THRESHOLD)


def counts(result) -> tuple[int, int, int]:
    return result["matched"], result["near_ties"], result["mismatched"]


def detections(rows: list[tuple[float, int, list[float]]], size: int = 5) -> dict[str, list]:
    """One image's TF OD API outputs from (score, class, box) rows, padded to ``size`` like the export's."""
    boxes, scores, classes = np.zeros((size, 4), "float32"), np.zeros(size, "float32"), np.zeros(size, "float32")
    for i, (score, cls, box) in enumerate(rows):
        boxes[i], scores[i], classes[i] = box, score, cls
    return {"detection_boxes": [boxes], "detection_scores": [scores], "detection_classes": [classes],
            "num_detections": [float(len(rows))]}


def moved(rows, by: float):
    return [(score, cls, [v + by for v in box]) for score, cls, box in rows]


A, B, C = [0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9], [0.0, 0.0, 0.3, 0.2]
THREE = [(0.7, 3, A), (0.7, 5, B), (0.4, 3, C)]


def test_the_order_of_tied_scores_is_not_a_difference():
    swapped = detections([(0.7, 5, B), (0.7, 3, A), (0.4, 3, C)])
    result = compare(detections(THREE), swapped)
    assert counts(result) == (3, 0, 0) and export_check.parity(result)
    assert result["max_abs_difference"] == {"detection_boxes": 0.0, "detection_scores": 0.0}


def test_a_swap_is_judged_at_the_models_own_nms_overlap():
    """Candidates overlapping at IoU 0.6 are two that NMS at 0.5 keeps only one of (either may win a
    near-equal score: a near tie), while NMS at 0.7 keeps both, so one missing is a real difference."""
    other = [0.1, 0.1, 0.5, 0.77]  # IoU 0.597 with A
    swapped = detections([(0.7, 3, other), (0.7, 5, B), (0.4, 3, C)])
    at_half, at_07 = (export_check.compare_detections(detections(THREE), swapped, TOLERANCE, SCORE_THRESHOLD, iou)
                      for iou in (0.5, 0.7))
    assert counts(at_half) == (2, 2, 0) and counts(at_07) == (2, 0, 2)


@pytest.mark.parametrize("changed", [
    [(0.7, 3, [0.3, 0.3, 0.7, 0.7]), (0.7, 5, B), (0.4, 3, C)],  # a box elsewhere (IoU 0.14)
    [(0.7, 3, A), (0.7, 4, B), (0.4, 3, C)],  # another class
    [(0.7, 3, A), (0.7, 5, B), (0.38, 3, C)],  # a score changed
    [(0.7, 3, A), (0.7, 5, B)],  # a detection lost
    [(0.7, 3, A), (0.7, 5, B), (0.4, 3, C), (0.2, 1, B)],  # a detection added
])
def test_real_differences_are_mismatches(changed):
    result = compare(detections(THREE), detections(changed))
    assert result["mismatched"] > 0 and not export_check.parity(result)


@pytest.mark.parametrize(("by", "near_ties"), [(0.002, 6), (0.06, 4)])  # IoU 0.99; 0.6-0.7, C's 0.39
def test_every_box_moved_past_the_tolerance_fails_the_check(by, near_ties):
    result = compare(detections(THREE), detections(moved(THREE, by)))
    # Each moved box that still overlaps its old place could alone be NMS's other choice; all cannot.
    assert counts(result) == (0, near_ties, 6 - near_ties)
    assert not export_check.parity(result)


def test_one_detection_excuses_one_swap_only():
    result = compare(detections([(0.7, 3, A)]),
                     detections([(0.7, 3, [0.1, 0.05, 0.5, 0.45]), (0.7, 3, [0.1, 0.15, 0.5, 0.55])]))
    assert counts(result) == (0, 2, 1)


def test_a_score_at_the_threshold_kept_by_one_run_only_is_a_near_tie():
    result = compare(detections(THREE), detections([*THREE, (SCORE_THRESHOLD + 0.0005, 2, B)]))
    assert counts(result) == (3, 1, 0)


def test_one_detection_matched_excuses_no_swap_besides():
    # An extra box next to a matched one, as close in score as a swap: nothing is left for it to swap with.
    result = compare(detections(THREE), detections([*THREE, (0.7, 3, [0.12, 0.1, 0.52, 0.5])]))
    assert counts(result) == (3, 0, 1) and result["near_tie_share"] == 0.0


def test_the_near_tie_share_is_of_both_runs_detections():
    result = compare(detections([(0.7, 3, A)]),
                     detections([(0.7, 3, [0.1, 0.05, 0.5, 0.45]), (0.7, 3, [0.1, 0.15, 0.5, 0.55])]))
    assert result["near_tie_share"] == 2 / 3  # two near ties and one mismatch of three detections


def test_a_difference_of_exactly_the_tolerance_is_within_it():
    # Binary fractions, so that the differences are exactly the tolerance in float32.
    expected = detections([(0.5, 3, [0.25, 0.25, 0.5, 0.5]), (0.375, 2, [0.5, 0.5, 0.75, 0.75])])
    got = detections([(0.625, 3, [0.375, 0.125, 0.625, 0.5])])
    result = export_check.compare_detections(expected, got, 0.125, 0.25, IOU_THRESHOLD)
    assert counts(result) == (1, 1, 0)  # the second: kept by one run, its score the tolerance above the threshold
    assert result["max_abs_difference"] == {"detection_boxes": 0.125, "detection_scores": 0.125}
    past = export_check.compare_detections(expected, got, 0.124, 0.25, IOU_THRESHOLD)
    assert counts(past) == (0, 0, 3)


def test_counts_add_up_over_the_images():
    swap = compare(detections([(0.7, 3, A)]), detections([(0.7, 3, [0.1, 0.05, 0.5, 0.45])]))
    assert counts(swap) == (0, 2, 0)
    both = {key: swap_value + same_value for (key, swap_value), same_value in zip(
        detections([(0.7, 3, A)]).items(), detections(THREE).values())}
    got = {key: swap_value + same_value for (key, swap_value), same_value in zip(
        detections([(0.7, 3, [0.1, 0.05, 0.5, 0.45])]).items(), detections(THREE).values())}
    assert counts(compare(both, got)) == (3, 2, 0)
    assert counts(compare({k: v[::-1] for k, v in both.items()}, {k: v[::-1] for k, v in got.items()})) == (3, 2, 0)


def test_no_detection_in_either_run_is_parity():
    result = compare(detections([]), detections([]))
    assert counts(result) == (0, 0, 0) and result["near_tie_share"] == 0.0 and export_check.parity(result)


# ---------------------------------------------------------------------------- a real NMS swap


def grid(count: int) -> list[list[float]]:
    """``count`` boxes of 8 px on a 10 px grid in the lower half of a 100 px image: none overlaps."""
    return [[60.0 + 10 * (i // 9), 5.0 + 10 * (i % 9), 68.0 + 10 * (i // 9), 13.0 + 10 * (i % 9)]
            for i in range(count)]


def decoded(anchors: list[list[float]], scores: np.ndarray, classes: int = 4) -> dict[str, list]:
    """The RetinaNet family's NMS (``DetectionDecoder``) on candidates that are exactly ``anchors``."""
    decoder = DetectionDecoder(image_size=100, score_threshold=SCORE_THRESHOLD, iou_threshold=IOU_THRESHOLD,
                               from_logits=False)
    logits = np.zeros((1, len(anchors), classes), "float32")
    logits[0, :, 0] = scores  # one class, so that NMS weighs every candidate against every other
    out = decoder(tf.zeros((1, len(anchors), 4)), tf.constant(logits), tf.constant(anchors, tf.float32))
    return {key: list(value.numpy()) for key, value in out.items()}


def kept_boxes(out) -> list[list[float]]:
    return np.round(out["detection_boxes"][0][:int(out["num_detections"][0])] * 100, 3).tolist()


P, Q = [10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0]  # IoU 0.90: NMS keeps one of the two
LOW = np.float32(0.6)
HIGH = np.nextafter(LOW, np.float32(1))  # one float32 step apart: how rounding differs between two graphs


def swap_runs(others: int) -> tuple[dict, dict]:
    anchors = [P, Q, *grid(others)]
    rest = np.linspace(0.3, 0.9, others, dtype="float32")
    return (decoded(anchors, np.array([HIGH, LOW, *rest], "float32")),
            decoded(anchors, np.array([LOW, HIGH, *rest], "float32")))


def test_a_real_nms_swap_of_two_near_equal_candidates_is_a_near_tie():
    keeps_p, keeps_q = swap_runs(others=19)
    assert P in kept_boxes(keeps_p) and Q not in kept_boxes(keeps_p)
    assert Q in kept_boxes(keeps_q) and P not in kept_boxes(keeps_q)
    result = compare(keeps_p, keeps_q)
    assert counts(result) == (19, 2, 0)
    assert result["near_tie_share"] == 2 / 40 == export_check.MAX_NEAR_TIE_SHARE
    assert export_check.parity(result)


def test_near_ties_beyond_their_share_fail_the_check():
    keeps_p, keeps_q = swap_runs(others=18)  # the same swap among fewer detections
    result = compare(keeps_p, keeps_q)
    assert counts(result) == (18, 2, 0) and result["near_tie_share"] > export_check.MAX_NEAR_TIE_SHARE
    assert not export_check.parity(result)


def test_the_same_nms_with_every_box_moved_fails_the_check():
    anchors = [P, *grid(19)]
    scores = np.linspace(0.3, 0.9, 20, dtype="float32")
    before, after = decoded(anchors, scores), decoded([[v + 0.2 for v in box] for box in anchors], scores)
    result = compare(before, after)
    assert counts(result) == (0, 40, 0) and not export_check.parity(result)


# ---------------------------------------------------------------------------- on the demo's export


@pytest.fixture(scope="module")
def trained(demo_repo):
    return family.load_trained(demo_repo / "models" / "checkpoints" / FINAL)


def check(version, reference, info, encoded, tolerance=TOLERANCE):
    return export_check.check_export(version, reference, info["image_size"], info["detection"], encoded,
                                     tolerance=tolerance, max_detections=100, signatures=["serving_default"])


@pytest.mark.slow
def test_check_fails_when_the_export_differs_from_the_model(trained, version_1, val_examples):
    fam, detector, info = trained
    stricter = {**info["detection"], "score_threshold": 0.5}
    reference = family.detection_function(fam, detector, info["image_size"], stricter)
    result = check(version_1, reference, {**info, "detection": stricter}, [e["encoded"] for e in val_examples[:4]],
                   tolerance=1e-4)
    assert not result["passed"] and result["mismatched"] > 0


@pytest.mark.slow
def test_check_fails_when_the_export_moves_every_box_past_the_tolerance(trained, version_1, val_examples):
    fam, detector, info = trained
    size, detection = info["image_size"], info["detection"]
    model = family.detection_function(fam, detector, size, detection, 100)

    def moved_boxes(images):  # what an export that resized differently would answer
        out = dict(model(images))
        valid = tf.sequence_mask(tf.cast(out["num_detections"], tf.int32), 100, tf.float32)
        out["detection_boxes"] += 2 * TOLERANCE * valid[..., None]
        return out

    encoded = [e["encoded"] for e in val_examples[:4]]
    result = check(version_1, moved_boxes, info, encoded)
    assert not result["passed"] and result["matched"] == 0 and result["near_tie_share"] == 1.0
    assert result["max_near_tie_share"] == export_check.MAX_NEAR_TIE_SHARE


@pytest.mark.slow
def test_check_passes_on_a_model_whose_scores_are_all_tied(trained, tmp_path, val_examples):
    fam, detector, info = trained
    layer = detector.classification_head.prediction_layer
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    layer.bias.assign(np.zeros(layer.bias.shape, "float32"))  # every anchor scores 0.5 for every class
    try:
        size, detection = info["image_size"], info["detection"]
        signatures.write_savedmodel(fam, detector, size, detection, 100, tmp_path / "1", ["serving_default"],
                                    ImageLimits(max_pixels=25_000_000, max_jpeg_scans=64))
        reference = family.detection_function(fam, detector, size, detection, 100)
        result = check(tmp_path / "1", reference, info, [e["encoded"] for e in val_examples[:4]])
    finally:
        layer.kernel.assign(kernel)
        layer.bias.assign(bias)
    assert result["passed"], result
    assert result["matched"] == 4 * 100  # 100 detections per image, all with score 0.5


@pytest.mark.slow
def test_check_fails_when_a_signature_is_not_the_contracts(trained, version_1, val_examples):
    fam, detector, info = trained
    reference = family.detection_function(fam, detector, info["image_size"], info["detection"], 100)
    result = export_check.check_export(version_1, reference, info["image_size"], info["detection"],
                                       [val_examples[0]["encoded"]], tolerance=TOLERANCE, max_detections=20,
                                       signatures=["serving_default"])
    assert result["mismatched"] == 0 and export_check.parity(result)  # the detections agree,
    assert not result["passed"]  # but saved_model_cli shows 100 detections where the contract says 20
    assert result["signatures"]["serving_default"]["matches_contract"] is False
