"""The exported signatures (detkit.serve.signatures) on the model that `make demo` trained: the
docs/export.md contract as saved_model_cli shows it, the extra signatures, GIFs, and the pixel
limit enforced inside the graph."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detkit.models import family
from detkit.serve import signatures
from detkit.train.checkpoints import FINAL
from tests.images import png_declaring

pytestmark = pytest.mark.slow

ALL = ["serving_default", "image_tensor", "tf_example"]


@pytest.fixture(scope="module")
def every_signature(demo_repo, tmp_path_factory) -> Path:
    """The demo's model written with all three signatures and 20 detections per image."""
    fam, detector, info = family.load_trained(demo_repo / "models" / "checkpoints" / FINAL)
    path = tmp_path_factory.mktemp("signatures") / "1"
    signatures.write_savedmodel(fam, detector, info["image_size"], info["detection"], 20, path, ALL,
                                max_pixels=25_000_000)
    return path


@pytest.fixture(scope="module")
def serving_default(version_1):
    return tf.saved_model.load(str(version_1)).signatures["serving_default"]


def test_saved_model_cli_shows_the_design_signature(version_1):
    text = subprocess.run([str(Path(sys.executable).with_name("saved_model_cli")), "show", "--dir", str(version_1),
                           "--tag_set", "serve", "--signature_def", "serving_default"],
                          capture_output=True, text=True, check=True).stdout
    assert "inputs['inputs'] tensor_info:\n      dtype: DT_STRING\n      shape: (-1)" in text
    assert "outputs['detection_boxes'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1, 100, 4)" in text
    for name in ("detection_classes", "detection_scores"):
        assert f"outputs['{name}'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1, 100)" in text
    assert "outputs['num_detections'] tensor_info:\n      dtype: DT_FLOAT\n      shape: (-1)" in text
    assert signatures.saved_model_cli_show(version_1, "serving_default") == signatures.expected_signature(100)


def test_extra_signatures_agree_with_serving_default(every_signature, val_examples):
    loaded = tf.saved_model.load(str(every_signature))
    for name in ALL:
        assert signatures.saved_model_cli_show(every_signature, name) == signatures.expected_signature(20, name)
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
