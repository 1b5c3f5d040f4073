"""The export stage on the model that `make demo` trained: TF Serving layout, the docs/export.md
signature (as saved_model_cli shows it), the export check, versions, extra signatures."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detkit.config import load_config
from detkit.data.images import ImageLimits
from detkit.data.labelmap import read_label_map
from detkit.models import family
from detkit.serve import export_check, signatures
from detkit.train.checkpoints import FINAL
from stages import export
from tests.images import png_declaring

pytestmark = pytest.mark.slow


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def version_1(demo_repo) -> Path:
    return demo_repo / "models" / "export" / "pet_object_detection" / "1"


@pytest.fixture(scope="module")
def reexported(demo_repo, tmp_path_factory):
    """The demo's export folder copied, then exported again with both extra signatures."""
    out = tmp_path_factory.mktemp("export") / "export"
    shutil.copytree(demo_repo / "models" / "export", out)
    before = tree_digest(out / "pet_object_detection" / "1")
    cfg = load_config(overrides=["dataset=sample", "export.extra_signatures=[image_tensor,tf_example]",
                                 "export.max_detections=20"])
    summary = export.run(cfg, {"checkpoints": demo_repo / "models" / "checkpoints",
                               "records": demo_repo / "data" / "records"}, {"export": out})
    return out, before, summary


def test_layout_is_tf_servings_with_label_map_and_passed_check(demo_repo, version_1):
    assert (version_1 / "saved_model.pb").is_file() and (version_1 / "variables" / "variables.index").is_file()
    assert read_label_map(version_1 / "assets.extra" / "label_map.pbtxt") == \
        read_label_map(demo_repo / "data" / "records" / "label_map.pbtxt")
    check = json.loads((version_1 / "assets.extra" / "export_check.json").read_text())
    assert check["passed"] and check["images"] == 16 and check["version"] == 1
    assert check["matched"] > 0 and check["mismatched"] == 0
    assert max(check["max_abs_difference"].values()) <= check["tolerance"] == 1e-3


def test_saved_model_cli_shows_the_design_signature(version_1):
    text = subprocess.run([str(Path(sys.executable).with_name("saved_model_cli")), "show", "--dir", str(version_1),
                           "--tag_set", "serve", "--signature_def", "serving_default"],
                          capture_output=True, text=True, check=True).stdout
    assert "inputs['inputs'] tensor_info:\n      dtype: DT_STRING\n      shape: (-1)" in text
    assert "outputs['detection_boxes'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1, 100, 4)" in text
    for name in ("detection_classes", "detection_scores"):
        assert f"outputs['{name}'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1, 100)" in text
    assert "outputs['num_detections'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1)" in text
    assert signatures.saved_model_cli_show(version_1, "serving_default") == \
        signatures.expected_signature(100)


def test_reexport_adds_a_version_and_leaves_the_old_one(reexported):
    out, before, summary = reexported
    assert summary["version"] == 2 and summary["check"]["passed"]
    assert tree_digest(out / "pet_object_detection" / "1") == before
    shown = signatures.saved_model_cli_show(out / "pet_object_detection" / "2", "serving_default")
    assert shown["outputs"]["detection_boxes"] == ["DT_FLOAT", "(-1, 20, 4)"]


def test_an_existing_version_is_never_overwritten(reexported, demo_repo):
    out, _, _ = reexported
    before = tree_digest(out)
    cfg = load_config(overrides=["dataset=sample", "export.version=1"])
    with pytest.raises(export.ExportError, match="version 1 exists and is never overwritten"):
        export.run(cfg, {"checkpoints": demo_repo / "models" / "checkpoints",
                         "records": demo_repo / "data" / "records"}, {"export": out})
    assert tree_digest(out) == before


def test_extra_signatures_agree_with_serving_default(reexported, val_examples):
    out, _, _ = reexported
    loaded = tf.saved_model.load(str(out / "pet_object_detection" / "2"))
    for name in ("image_tensor", "tf_example"):
        shown = signatures.saved_model_cli_show(out / "pet_object_detection" / "2", name)
        assert shown == signatures.expected_signature(20, name)
    encoded = val_examples[0]["encoded"]
    reference = loaded.signatures["serving_default"](inputs=tf.constant([encoded]))
    pixels = tf.io.decode_jpeg(encoded, channels=3)[None]  # TensorFlow's decoder, as serving_default's
    from_tensor = loaded.signatures["image_tensor"](inputs=pixels)
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}))
    from_example = loaded.signatures["tf_example"](inputs=tf.constant([example.SerializeToString()]))
    for got in (from_tensor, from_example):
        assert got["num_detections"].numpy() == reference["num_detections"].numpy()
        for key in ("detection_boxes", "detection_scores", "detection_classes"):
            np.testing.assert_allclose(got[key].numpy(), reference[key].numpy(), atol=1e-5)
    too_large = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png_declaring(20000, 20000)]))}))
    with pytest.raises(tf.errors.InvalidArgumentError, match="exceeds export.max_image_pixels = 25000000"):
        loaded.signatures["tf_example"](inputs=tf.constant([too_large.SerializeToString()]))


@pytest.fixture(scope="module")
def serving_default(version_1):
    return tf.saved_model.load(str(version_1)).signatures["serving_default"]


def test_animated_gif_is_read_by_its_first_frame(serving_default, val_examples):
    frames = [Image.open(io.BytesIO(val_examples[i]["encoded"])).convert("RGB").resize((200, 160)) for i in (0, 1)]
    animated, still = io.BytesIO(), io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    frames[0].save(still, "GIF")
    got = serving_default(inputs=tf.constant([animated.getvalue(), still.getvalue()]))
    np.testing.assert_allclose(got["detection_boxes"][0], got["detection_boxes"][1], atol=1e-6)


def test_an_image_over_the_pixel_limit_is_refused_and_the_next_call_answers(serving_default, val_examples):
    good = val_examples[0]["encoded"]
    # In one batch with a good image: the whole call is refused, as TF Serving refuses the request.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image of 20000 x 20000 pixels exceeds "
                                                              r"export\.max_image_pixels = 25000000: refused before"):
        serving_default(inputs=tf.constant([good, png_declaring(20000, 20000)]))
    got = serving_default(inputs=tf.constant([good]))
    assert got["num_detections"].numpy()[0] > 0


def test_check_fails_when_the_export_differs_from_the_model(demo_repo, version_1, val_examples):
    fam, detector, info = family.load_trained(demo_repo / "models" / "checkpoints" / FINAL)
    stricter = {**info["detection"], "score_threshold": 0.5}
    stricter = family.detection_function(fam, detector, info["image_size"], stricter)
    check = export_check.check_export(version_1, stricter, info["image_size"], 0.5,
                                      [e["encoded"] for e in val_examples[:4]], tolerance=1e-4, max_detections=100,
                                      signatures=["serving_default"])
    assert not check["passed"]
    assert check["mismatched"] > 0


def detections(rows: list[tuple[float, int, list[float]]], size: int = 5) -> dict[str, list]:
    """One image's TF OD API outputs from (score, class, box) rows, padded to ``size`` like the export's."""
    boxes, scores, classes = np.zeros((size, 4), "float32"), np.zeros(size, "float32"), np.zeros(size, "float32")
    for i, (score, cls, box) in enumerate(rows):
        boxes[i], scores[i], classes[i] = box, score, cls
    return {"detection_boxes": [boxes], "detection_scores": [scores], "detection_classes": [classes],
            "num_detections": [float(len(rows))]}


A, B, C = [0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9], [0.0, 0.0, 0.3, 0.2]


def test_compare_detections_does_not_depend_on_the_order_of_tied_scores():
    expected = detections([(0.7, 3, A), (0.7, 5, B), (0.4, 3, C)])
    swapped = detections([(0.7, 5, B), (0.7, 3, A), (0.4, 3, C)])
    result = export_check.compare_detections(expected, swapped, 1e-3, score_threshold=0.05)
    assert result == {"matched": 3, "near_ties": 0, "mismatched": 0,
                      "max_abs_difference": {"detection_boxes": 0.0, "detection_scores": 0.0}}


def test_compare_detections_matches_an_nms_swap_of_near_identical_candidates():
    # Two candidates of one class, scores and boxes equal up to rounding: NMS keeps either.
    kept_a = detections([(0.6000004, 2, A), (0.3, 1, C)])
    kept_b = detections([(0.6, 2, [v + 1e-7 for v in A]), (0.3, 1, C)])
    result = export_check.compare_detections(kept_a, kept_b, 1e-6, score_threshold=0.05)
    assert (result["matched"], result["near_ties"], result["mismatched"]) == (2, 0, 0)


def test_compare_detections_refuses_an_overlapping_box_moved_past_the_tolerance():
    kept_a = detections([(0.6, 2, A), (0.3, 1, C)])
    kept_b = detections([(0.6, 2, [0.12, 0.1, 0.52, 0.5]), (0.3, 1, C)])  # IoU 0.9 with A, moved by 0.02
    result = export_check.compare_detections(kept_a, kept_b, 1e-3, score_threshold=0.05)
    assert (result["matched"], result["near_ties"], result["mismatched"]) == (1, 0, 2)


@pytest.mark.parametrize("changed", [
    [(0.7, 3, [0.3, 0.3, 0.7, 0.7]), (0.7, 5, B), (0.4, 3, C)],  # a box elsewhere (IoU 0.14)
    [(0.7, 3, A), (0.7, 4, B), (0.4, 3, C)],  # another class
    [(0.7, 3, A), (0.7, 5, B), (0.38, 3, C)],  # a score changed
    [(0.7, 3, A), (0.7, 5, B)],  # a detection lost
])
def test_compare_detections_refuses_real_differences(changed):
    expected = detections([(0.7, 3, A), (0.7, 5, B), (0.4, 3, C)])
    result = export_check.compare_detections(expected, detections(changed), 1e-3, score_threshold=0.05)
    assert result["mismatched"] > 0


def test_export_check_passes_on_a_model_whose_scores_are_all_tied(demo_repo, tmp_path, val_examples):
    fam, detector, info = family.load_trained(demo_repo / "models" / "checkpoints" / FINAL)
    layer = detector.classification_head.prediction_layer
    layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    layer.bias.assign(np.zeros(layer.bias.shape, "float32"))  # every anchor scores 0.5 for every class
    size, detection = info["image_size"], info["detection"]
    signatures.write_savedmodel(fam, detector, size, detection, 100, tmp_path / "1", ["serving_default"],
                                ImageLimits(25_000_000, 64))
    reference = family.detection_function(fam, detector, size, detection, 100)
    check = export_check.check_export(tmp_path / "1", reference, size, detection["score_threshold"],
                                      [e["encoded"] for e in val_examples[:4]], tolerance=1e-3, max_detections=100,
                                      signatures=["serving_default"])
    assert check["passed"], check
    assert check["matched"] == 4 * 100  # 100 detections per image, all with score 0.5
