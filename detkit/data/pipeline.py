"""tf.data input pipelines from the TF OD API TFRecords (``detkit.data.records``, docs/tfrecords.md).

Resizing: every image is stretched to ``size`` x ``size`` (aspect ratio not kept, no
padding; ``resize_image``). Normalised box coordinates are therefore unchanged by the
resize, and detections in normalised coordinates are directly relative to the original
image. Training, eval and export all resize with ``resize_image``.

``train_dataset`` yields ``(images, targets)`` batches for ``fit``:

- ``images`` float32 ``[B, size, size, 3]``, pixel values in [0, 255] (the model normalises them);
- ``targets``: what the detector family's ``training_targets`` makes of each example's
  ``boxes`` float32 ``[max_boxes + 1, 4]`` normalised ``[ymin, xmin, ymax, xmax]`` and
  ``labels`` float32 ``[max_boxes + 1]`` 0-based model classes (label-map id - 1), both padded
  with -1 rows (the first ``max_boxes`` boxes of an image are kept; there is always at least
  one padding row: KerasHub's box matcher gathers out of range without one).

Augmentations (``train.augment``, in this order): random crop that keeps every box whole
(``crop_min_scale``: each side at least this share of the image; boxes renormalised to the
crop), horizontal flip (boxes mirrored: ``xmin' = 1 - xmax``), brightness and contrast
jitter. The class look of the sample dataset survives all of them (no hue change).

``eval_dataset`` yields dicts without augmentation: ``images`` as above, ``height``/``width``
(original image size, int32), ``filename``/``source_id`` (string), ``boxes`` normalised
``[ymin, xmin, ymax, xmax]`` of the original image (float32 ``[B, M, 4]``, padded with 0),
``labels`` 1-based label-map ids (int32 ``[B, M]``, padded with 0), ``num_boxes`` (int32) and,
with ``with_encoded=True``, ``encoded`` (the record's image bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf

from detkit.data import images
from detkit.data.images import ImageLimits
from detkit.data.records import feature_spec

AUTOTUNE = tf.data.AUTOTUNE
ENCODED = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}  # the image bytes only, undecoded


class DataError(ValueError):
    """No records to read: names the folder and split."""


def shard_files(records: Path, split: str) -> list[str]:
    files = sorted(str(p) for p in Path(records).glob(f"{split}-*.tfrecord"))
    if not files:
        raise DataError(f"{records}: no {split}-*.tfrecord shards; run the tfrecord stage")
    return files


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """One serialised TF OD API example -> decoded uint8 RGB image, normalised yxyx boxes, 1-based labels."""
    ex = tf.io.parse_single_example(serialized, feature_spec())
    dense = {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in ex.items()}
    image = tf.io.decode_image(dense["image/encoded"], channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    boxes = tf.stack([dense[f"image/object/bbox/{k}"] for k in ("ymin", "xmin", "ymax", "xmax")], axis=-1)
    return {
        "image": image,
        "boxes": tf.reshape(tf.clip_by_value(boxes, 0.0, 1.0), [-1, 4]),
        "labels": tf.cast(dense["image/object/class/label"], tf.int32),
        "height": tf.cast(dense["image/height"], tf.int32),
        "width": tf.cast(dense["image/width"], tf.int32),
        "filename": dense["image/filename"],
        "source_id": dense["image/source_id"],
    }


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Stretch to ``size`` x ``size`` (bilinear), float32 in [0, 255]: normalised boxes stay valid.

    A uint8 image is resized as it is (the op computes in float32 and returns float32, the same
    values as resizing its float32 copy): a full-size float32 copy would cost 12 bytes a pixel.
    """
    return tf.image.resize(image, (size, size), method="bilinear", antialias=False)


def decode_and_resize(encoded: tf.Tensor, size: int, limits: ImageLimits | None = None) -> tf.Tensor:
    """Encoded image bytes (scalar string) -> model-sized float32 image: the export input path.

    ``limits`` (serving): an image over them is refused with an InvalidArgumentError before it is
    decoded (``detkit.data.images``).
    """
    return resize_image(images.decode(encoded, limits), size)


# ---------------------------------------------------------------------------- augmentation


def random_crop(image: tf.Tensor, boxes: tf.Tensor, min_scale: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A random crop with sides >= ``min_scale`` of the image that keeps every box whole."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    # The crop must contain the union of the boxes; sample its extent per axis.
    has_boxes = tf.shape(boxes)[0] > 0
    centre = tf.constant([0.5, 0.5])
    lo = tf.cond(has_boxes, lambda: tf.reduce_min(boxes[:, :2], axis=0), lambda: centre)
    hi = tf.cond(has_boxes, lambda: tf.reduce_max(boxes[:, 2:], axis=0), lambda: centre)
    need = hi - lo  # union extent [dy, dx]
    u = tf.random.stateless_uniform([4], seed=seed)
    side = tf.maximum(min_scale + (1.0 - min_scale) * u[:2], need)  # crop extent [ch, cw] in [need, 1]
    start_min = tf.maximum(0.0, hi - side)
    start_max = tf.minimum(lo, 1.0 - side)
    start = start_min + (start_max - start_min) * u[2:]
    y0 = tf.cast(tf.floor(start[0] * h), tf.int32)
    x0 = tf.cast(tf.floor(start[1] * w), tf.int32)
    y1 = tf.minimum(tf.cast(tf.math.ceil((start[0] + side[0]) * h), tf.int32), shape[0])
    x1 = tf.minimum(tf.cast(tf.math.ceil((start[1] + side[1]) * w), tf.int32), shape[1])
    y1, x1 = tf.maximum(y1, y0 + 1), tf.maximum(x1, x0 + 1)
    cropped = image[y0:y1, x0:x1]
    oy, ox = tf.cast(y0, tf.float32) / h, tf.cast(x0, tf.float32) / w
    sy, sx = tf.cast(y1 - y0, tf.float32) / h, tf.cast(x1 - x0, tf.float32) / w
    boxes = (boxes - tf.stack([oy, ox, oy, ox])) / tf.stack([sy, sx, sy, sx])
    return cropped, tf.clip_by_value(boxes, 0.0, 1.0)


def hflip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirror left-right; yxyx normalised boxes: xmin' = 1 - xmax, xmax' = 1 - xmin."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return tf.image.flip_left_right(image), tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)


def augment(example: dict[str, tf.Tensor], cfg: Any, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """``cfg`` is ``train.augment``; ``seed`` a stateless [2] int seed, one per example."""
    image, boxes = example["image"], example["boxes"]
    seeds = tf.random.experimental.stateless_split(seed, 4)
    if cfg.crop_min_scale < 1.0:
        image, boxes = random_crop(image, boxes, float(cfg.crop_min_scale), seeds[0])
    if cfg.hflip:
        flip = tf.random.stateless_uniform([], seed=seeds[1]) < 0.5
        image, boxes = tf.cond(flip, lambda: hflip(image, boxes), lambda: (image, boxes))
    return {**example, "image": image, "boxes": boxes, "_photo_seeds": seeds[2:]}


def _photometric(image: tf.Tensor, cfg: Any, seeds: tf.Tensor) -> tf.Tensor:
    """Brightness/contrast on the resized float image in [0, 255]."""
    if cfg.brightness > 0:
        image = tf.image.stateless_random_brightness(image, 255.0 * float(cfg.brightness), seed=seeds[0])
    if cfg.contrast > 0:
        image = tf.image.stateless_random_contrast(image, 1.0 - float(cfg.contrast), 1.0 + float(cfg.contrast),
                                                   seed=seeds[1])
    return tf.clip_by_value(image, 0.0, 255.0)


# ---------------------------------------------------------------------------- datasets


def _records(records: Path, split: str, shuffle_files: bool, seed: int | None,
             deterministic: bool = True) -> tf.data.Dataset:
    files = shard_files(records, split)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # Parallel steps take tf.data's fixed defaults instead of its autotuner: deleting an iterator waits out the
    # autotuner's current sleep (it doubles up to a minute), so the end of an eval loop or of a training stop
    # stalled the process with the CPU idle, one run in two (8-20 s measured). Options pass on to every
    # dataset built on this one.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8), num_parallel_calls=AUTOTUNE,
                         deterministic=deterministic).with_options(options)


def encoded_images(records: Path, split: str, count: int) -> list[bytes]:
    """The first ``count`` images of ``split`` as stored (encoded bytes), in ``eval_dataset``'s order."""
    examples = _records(records, split, shuffle_files=False, seed=None).take(count)
    return [tf.io.parse_single_example(s, ENCODED)["image/encoded"].numpy() for s in examples]


def train_dataset(records: Path, size: int, batch_size: int, augment_cfg: Any = None, max_boxes: int = 16,
                  shuffle_buffer: int = 1024, seed: int = 0, repeat: bool = True,
                  split: str = "train", deterministic: bool = True,
                  targets: Callable[[tf.Tensor, tf.Tensor, int], Any] | None = None) -> tf.data.Dataset:
    """Endless (``repeat``) shuffled, augmented, batched training data; see the module doc.

    ``targets``: the family's ``training_targets`` (boxes, labels, size) -> ``fit``'s y; None
    yields ``{"boxes", "labels"}`` as they are.

    ``deterministic``: the same ``seed`` gives the same batches (parallel work keeps its order);
    ``False`` lets tf.data hand out whichever example is ready first (a little faster).
    """
    ds = _records(records, split, shuffle_files=True, seed=seed, deterministic=deterministic)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    # One stateless seed per example (its position in the stream): reproducible augmentation.
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed).batch(2)))

    def prepare(serialized, example_seed):
        ex = parse_example(serialized)
        if augment_cfg is not None:
            ex = augment(ex, augment_cfg, example_seed)
        image = resize_image(ex["image"], size)
        if augment_cfg is not None:
            image = _photometric(image, augment_cfg, ex["_photo_seeds"])
        boxes = ex["boxes"][:max_boxes]
        labels = tf.cast(ex["labels"][:max_boxes] - 1, tf.float32)  # label-map ids are 1-based, models 0-based
        rows = max_boxes + 1
        pad = rows - tf.shape(labels)[0]
        boxes = tf.pad(boxes, [[0, pad], [0, 0]], constant_values=-1.0)
        labels = tf.pad(labels, [[0, pad]], constant_values=-1.0)
        boxes.set_shape([rows, 4])
        labels.set_shape([rows])
        image.set_shape([size, size, 3])
        return image, targets(boxes, labels, size) if targets else {"boxes": boxes, "labels": labels}

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return ds.batch(batch_size, drop_remainder=repeat).prefetch(AUTOTUNE)


def eval_dataset(records: Path, size: int, batch_size: int, split: str = "val",
                 with_encoded: bool = False) -> tf.data.Dataset:
    """Every example of ``split`` once, in shard order, unaugmented; see the module doc.

    ``with_encoded`` adds ``encoded``: the record's original image bytes (string), e.g. for drawing.
    """
    ds = _records(records, split, shuffle_files=False, seed=None)

    def prepare(serialized):
        ex = parse_example(serialized)
        extra = {"encoded": tf.io.parse_single_example(serialized, ENCODED)["image/encoded"]} if with_encoded else {}
        return {
            **extra,
            "images": resize_image(ex["image"], size),
            "height": ex["height"],
            "width": ex["width"],
            "filename": ex["filename"],
            "source_id": ex["source_id"],
            "boxes": ex["boxes"],
            "labels": ex["labels"],
            "num_boxes": tf.shape(ex["labels"])[0],
        }

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.padded_batch(batch_size).prefetch(AUTOTUNE)
