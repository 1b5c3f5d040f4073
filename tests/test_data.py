"""detkit.data.pipeline: the tf.data pipelines keep images and boxes consistent through resize and augmentation."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image

from detkit.data import pipeline as D
from detkit.data.labelmap import read_label_map
from detkit.data.records import encode_example

AUGMENT_ALL = OmegaConf.create({"hflip": True, "crop_min_scale": 0.5, "brightness": 0.1, "contrast": 0.1})
AUGMENT_NONE = OmegaConf.create({"hflip": False, "crop_min_scale": 1.0, "brightness": 0.0, "contrast": 0.0})


def _red_box_image(width, height, box, seed):
    """Grey noise with one pure red rectangle at normalised yxyx ``box`` (pixel edges)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 140, size=(height, width, 1), dtype=np.uint8).repeat(3, axis=2)
    y0, x0, y1, x1 = (round(box[0] * height), round(box[1] * width), round(box[2] * height), round(box[3] * width))
    pixels[y0:y1, x0:x1] = (255, 0, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: the red edges stay exact
    return buffer.getvalue(), [y0 / height, x0 / width, y1 / height, x1 / width]


@pytest.fixture(scope="module")
def red_records(tmp_path_factory):
    """Records of images with one red box each, of varied sizes and aspect ratios; label id 5."""
    out = tmp_path_factory.mktemp("red_records")
    rng = np.random.default_rng(0)
    boxes = {}
    with tf.io.TFRecordWriter(str(out / "train-00000-of-00001.tfrecord")) as writer:
        for i in range(24):
            width, height = int(rng.integers(90, 300)), int(rng.integers(90, 300))
            y0, x0 = rng.uniform(0.0, 0.6, size=2)
            y1, x1 = y0 + rng.uniform(0.2, 1.0 - y0), x0 + rng.uniform(0.2, 1.0 - x0)
            encoded, box = _red_box_image(width, height, (y0, x0, y1, x1), i)
            boxes[f"img_{i}.png"] = box
            writer.write(encode_example({
                "height": height, "width": width, "filename": f"img_{i}.png", "encoded": encoded,
                "sha256": hashlib.sha256(encoded).hexdigest(),
                "ymin": [box[0]], "xmin": [box[1]], "ymax": [box[2]], "xmax": [box[3]],
                "text": ["red"], "label": [5], "difficult": [0], "truncated": [0], "view": [""],
            }))
    return out, boxes


def _red_extent(image):
    """Pixel extent [y0, x0, y1, x1] (edges) of the clearly red pixels of a float image."""
    image = np.asarray(image)
    red = (image[..., 0] > 170) & (image[..., 1] < 90) & (image[..., 2] < 90)
    ys, xs = np.nonzero(red)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], dtype=np.float32)


def test_train_batches_have_the_fit_format(sample_records):
    ds = D.train_dataset(sample_records, 64, 4, AUGMENT_ALL, max_boxes=3, shuffle_buffer=16, seed=1)
    images, targets = next(iter(ds))
    assert images.shape == (4, 64, 64, 3) and images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
    assert set(targets) == {"boxes", "labels"}
    boxes, labels = targets["boxes"].numpy(), targets["labels"].numpy()
    assert boxes.shape == (4, 4, 4) and labels.shape == (4, 4)  # max_boxes + 1 rows: always some padding
    assert boxes.dtype == np.float32 and labels.dtype == np.float32
    real = labels >= 0
    assert real[:, 0].all() and not real[:, 1:].any()  # the sample has one head per image
    assert (boxes[~real] == -1).all()  # padding rows are -1
    assert ((0 <= labels[real]) & (labels[real] <= 36)).all()  # 0-based: label-map ids minus one
    b = boxes[real]
    assert ((0 <= b) & (b <= 1)).all() and (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()  # normalised


@pytest.mark.parametrize("augment_cfg", [AUGMENT_NONE, AUGMENT_ALL], ids=["plain", "crop+flip+photometric"])
def test_boxes_follow_the_pixels_through_resize_and_augmentation(red_records, augment_cfg):
    records, _ = red_records
    size = 96
    ds = D.train_dataset(records, size, 8, augment_cfg, max_boxes=2, shuffle_buffer=24, seed=3)
    for images, targets in ds.take(6):
        for image, box, label in zip(images.numpy(), targets["boxes"].numpy(), targets["labels"].numpy()):
            assert label[0] == 4 and (label[1:] == -1).all()  # label-map id 5 -> class 4
            # Bilinear resize blurs an edge by about a pixel; a box/pixel mismatch would be far more.
            np.testing.assert_allclose(box[0] * size, _red_extent(image), atol=2.0)


def test_hflip_mirrors_image_and_boxes():
    image = np.zeros((4, 10, 3), np.float32)
    image[:, 0] = 1.0
    flipped, boxes = D.hflip(tf.constant(image), tf.constant([[0.1, 0.2, 0.5, 0.3]]))
    assert flipped.numpy()[:, 9].min() == 1.0 and flipped.numpy()[:, 0].max() == 0.0
    np.testing.assert_allclose(boxes.numpy(), [[0.1, 0.7, 0.5, 0.8]], atol=1e-6)


def test_random_crop_keeps_every_box_whole():
    image = tf.zeros((200, 100, 3), tf.uint8)
    boxes = tf.constant([[0.1, 0.2, 0.4, 0.5], [0.5, 0.6, 0.9, 0.8]])
    for i in range(20):
        cropped, new = D.random_crop(image, boxes, 0.3, tf.constant([i, 7]))
        h, w = cropped.shape[0], cropped.shape[1]
        assert h >= 0.3 * 200 - 1 and w >= 0.3 * 100 - 1
        new = new.numpy()
        # Back to original pixels: the same boxes, so nothing was cut off.
        assert (new >= 0).all() and (new <= 1).all()
        sizes = (new[:, 2:] - new[:, :2]) * [h, w]
        np.testing.assert_allclose(sizes, (boxes[:, 2:] - boxes[:, :2]).numpy() * [200, 100], atol=1e-3)


def test_eval_dataset_keeps_originals(sample_records):
    stats = json.loads((sample_records / "stats.json").read_text())
    label_map = read_label_map(sample_records / "label_map.pbtxt")
    seen = 0
    for batch in D.eval_dataset(sample_records, 64, 16, with_encoded=True):
        n = batch["images"].shape[0]
        assert batch["images"].shape[1:] == (64, 64, 3)
        first = tf.io.decode_jpeg(batch["encoded"][0])
        assert first.shape[:2] == (int(batch["height"][0]), int(batch["width"][0]))
        for i in range(n):
            name = batch["filename"][i].numpy().decode()
            assert batch["source_id"][i].numpy().decode() == name
            assert 160 <= int(batch["height"][i]) <= 288 and 160 <= int(batch["width"][i]) <= 288
            k = int(batch["num_boxes"][i])
            assert k == 1
            label = int(batch["labels"][i, 0])
            assert label_map[label] == name.rsplit("_", 1)[0]  # 1-based ids, as in the label map
            box = batch["boxes"][i, 0].numpy()
            assert (0 <= box).all() and (box <= 1).all() and box[0] < box[2] and box[1] < box[3]
        seen += n
    assert seen == stats["splits"]["val"]["examples"]


def test_decode_and_resize_matches_the_pipeline(red_records):
    records, boxes = red_records
    raw = next(iter(tf.data.TFRecordDataset(D.shard_files(records, "train"))))
    example = D.parse_example(raw)
    direct = D.resize_image(example["image"], 80)
    from_bytes = D.decode_and_resize(tf.io.parse_single_example(raw, {
        "image/encoded": tf.io.FixedLenFeature([], tf.string)})["image/encoded"], 80)
    np.testing.assert_array_equal(direct.numpy(), from_bytes.numpy())
    # Resized from uint8 (no full-size float32 copy): the same values as from its float32 copy.
    from_float = tf.image.resize(tf.cast(example["image"], tf.float32), (80, 80), method="bilinear", antialias=False)
    np.testing.assert_array_equal(direct.numpy(), from_float.numpy())


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(D.DataError, match="no train-\\*.tfrecord shards"):
        D.train_dataset(tmp_path, 64, 2)
