"""The TF Object Detection API's tf.train.Example keys (DESIGN 4.2), written and parsed here
only, so records made by this project feed TF OD API tooling and vice versa."""

from __future__ import annotations

from typing import Any

BOX_KEYS = ("xmin", "xmax", "ymin", "ymax")


def encode_example(record: dict[str, Any]) -> bytes:
    """Serialise one image's record (see ``stages.tfrecord.load_example``) deterministically."""
    import tensorflow as tf

    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    def strings(values):
        encoded = [v if isinstance(v, bytes) else v.encode() for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=encoded))

    feature = {
        "image/height": ints([record["height"]]),
        "image/width": ints([record["width"]]),
        "image/filename": strings([record["filename"]]),
        "image/source_id": strings([record["filename"]]),
        "image/key/sha256": strings([record["sha256"]]),
        "image/encoded": strings([record["encoded"]]),
        "image/format": strings([b"jpeg"]),
        **{f"image/object/bbox/{k}": floats(record[k]) for k in BOX_KEYS},
        "image/object/class/text": strings(record["text"]),
        "image/object/class/label": ints(record["label"]),
        "image/object/difficult": ints(record["difficult"]),
        "image/object/truncated": ints(record["truncated"]),
        "image/object/view": strings(record["view"]),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Map fields serialise in arbitrary order unless asked: byte-identical shards need this.
    return example.SerializeToString(deterministic=True)


def feature_spec() -> dict[str, Any]:
    """``tf.io.parse_single_example`` spec for the keys above."""
    import tensorflow as tf

    spec = {
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
        "image/source_id": tf.io.FixedLenFeature([], tf.string),
        "image/key/sha256": tf.io.FixedLenFeature([], tf.string),
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/object/class/text": tf.io.VarLenFeature(tf.string),
        "image/object/class/label": tf.io.VarLenFeature(tf.int64),
        "image/object/difficult": tf.io.VarLenFeature(tf.int64),
        "image/object/truncated": tf.io.VarLenFeature(tf.int64),
        "image/object/view": tf.io.VarLenFeature(tf.string),
    }
    spec.update({f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in BOX_KEYS})
    return spec
