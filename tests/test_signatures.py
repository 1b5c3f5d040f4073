"""The exported signatures (detkit.serve.signatures) on the model that `make demo` trained: the
docs/export.md contract as saved_model_cli shows it, the extra signatures, GIFs, and the pixel
limit enforced inside the graph."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detkit.data.labelmap import read_label_map
from detkit.serve import signatures
from harness.images import png_declaring

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def every_signature(reexported) -> Path:
    """The demo's model exported again with all three signatures and 20 detections per image."""
    return reexported[0] / "pet_object_detection" / "2"


@pytest.fixture(scope="module")
def serving_default(version_1):
    return tf.saved_model.load(str(version_1)).signatures["serving_default"]


def cli_text(version: Path, signature: str) -> str:
    """What the real ``saved_model_cli show`` prints for ``signature``."""
    return subprocess.run([str(Path(sys.executable).with_name("saved_model_cli")), "show", "--dir", str(version),
                           "--tag_set", "serve", "--signature_def", signature],
                          capture_output=True, text=True, check=True).stdout


def test_saved_model_cli_shows_the_design_signature(version_1):
    text = cli_text(version_1, "serving_default")
    assert "inputs['inputs'] tensor_info:\n      dtype: DT_STRING\n      shape: (-1)" in text
    assert "outputs['detection_boxes'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1, 100, 4)" in text
    for name in ("detection_classes", "detection_scores"):
        assert f"outputs['{name}'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1, 100)" in text
    assert "outputs['num_detections'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1)" in text
    assert signatures.saved_model_cli_show(version_1)["serving_default"] == signatures.expected_signature(100)


def cli_show(version: Path, signature: str) -> dict:
    """The real ``saved_model_cli show`` for ``signature``, its printed tensors parsed."""
    text = cli_text(version, signature)
    shown = {"inputs": {}, "outputs": {}}
    for kind, name, dtype, shape in re.findall(r"(inputs|outputs)\['([^']+)'\] tensor_info:\s*dtype: (\w+)\s*"
                                               r"shape: (\([^)]*\)|unknown_rank)", text):
        shown[kind][name] = [dtype, shape]
    shown["method_name"] = re.search(r"Method name is: (\S+)", text).group(1)
    return shown


@pytest.mark.parametrize("signature", ["serving_default", "image_tensor", "tf_example"])
def test_the_export_check_reads_each_signature_as_saved_model_cli_prints_it(every_signature, signature):
    assert signatures.saved_model_cli_show(every_signature)[signature] == cli_show(every_signature, signature)


def test_extra_signatures_agree_with_serving_default(every_signature, val_examples):
    loaded = tf.saved_model.load(str(every_signature))  # saved_model_cli's view of each: test_export.py
    encoded = val_examples[0]["encoded"]
    reference = loaded.signatures["serving_default"](inputs=tf.constant([encoded]))
    assert reference["num_detections"].numpy()[0] > 0
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


def test_animated_gif_is_read_by_its_first_frame(serving_default, val_examples):
    frames = [Image.open(io.BytesIO(val_examples[i]["encoded"])).convert("RGB").resize((200, 160)) for i in (0, 1)]
    animated, still, second = io.BytesIO(), io.BytesIO(), io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    frames[0].save(still, "GIF")
    frames[1].save(second, "GIF")
    got = serving_default(inputs=tf.constant([animated.getvalue(), still.getvalue(), second.getvalue()]))
    np.testing.assert_allclose(got["detection_boxes"][0], got["detection_boxes"][1], atol=1e-6)
    assert not np.allclose(got["detection_boxes"][0], got["detection_boxes"][2], atol=1e-3)  # not the last frame


def test_an_image_over_the_pixel_limit_is_refused_and_the_next_call_answers(serving_default, val_examples):
    good = val_examples[0]["encoded"]
    # In one batch with a good image: the whole call is refused, as TF Serving refuses the request.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image of 20000 x 20000 pixels exceeds "
                                                              r"export\.max_image_pixels = 25000000: refused before"):
        serving_default(inputs=tf.constant([good, png_declaring(20000, 20000)]))
    got = serving_default(inputs=tf.constant([good]))
    assert got["num_detections"].numpy()[0] > 0


def encoded_as(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_serving_default_answers_as_docs_export_md_says(serving_default, version_1, val_examples):
    label_map = read_label_map(version_1 / "assets.extra" / "label_map.pbtxt")
    jpeg = val_examples[0]["encoded"]
    pixels = Image.open(io.BytesIO(jpeg)).convert("RGB")
    wide = pixels.resize((pixels.width * 2, pixels.height))  # another size and aspect: boxes stay normalised
    lossless = [encoded_as(pixels, "PNG"), encoded_as(pixels, "BMP"), encoded_as(pixels, "WEBP", lossless=True)]
    got = {k: v.numpy() for k, v in serving_default(inputs=tf.constant([jpeg, *lossless,
                                                                          encoded_as(wide, "PNG")])).items()}
    assert got["detection_boxes"].shape == (5, 100, 4) and got["num_detections"].shape == (5,)
    for i, count in enumerate(got["num_detections"].astype(int)):
        boxes, scores, classes = got["detection_boxes"][i], got["detection_scores"][i], got["detection_classes"][i]
        assert 0 < count <= 100
        assert np.all((boxes[:count] >= 0) & (boxes[:count] <= 1))
        assert np.all(boxes[:count, 2] >= boxes[:count, 0]) and np.all(boxes[:count, 3] >= boxes[:count, 1])
        assert np.all(np.diff(scores[:count]) <= 0) and np.all((scores[:count] > 0) & (scores[:count] <= 1))
        assert set(classes[:count]) <= set(map(float, label_map))  # 1-based label-map ids, as floats
        assert not boxes[count:].any() and not scores[count:].any() and not classes[count:].any()
    for i in (2, 3):  # the same pixels in PNG, BMP and lossless WebP: the same answer
        for key in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
            np.testing.assert_array_equal(got[key][i], got[key][1], err_msg=key)
    for i in (0, 4):  # TensorFlow's JPEG decoder, and a stretched copy: the same best detection
        assert got["detection_classes"][i][0] == got["detection_classes"][1][0] == val_examples[0]["labels"][0]
        np.testing.assert_allclose(got["detection_boxes"][i][0], got["detection_boxes"][1][0], atol=0.02)
