"""The TF Object Detection API's tf.train.Example keys (docs/tfrecords.md), written and parsed here
only, so records made by this project feed TF OD API tooling and vice versa.

Examples are serialised and framed without TensorFlow: ``tf.train.Example``'s schema (TF's
``feature.proto`` / ``example.proto``) is declared below in a private protobuf descriptor
pool, and ``TFRecordFile`` writes TFRecord framing (length, masked CRC-32C of length and
data) itself. The tfrecord stage never imports TensorFlow; its files are byte-identical to
``tf.io.TFRecordWriter``'s, so TensorFlow reads them as its own.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

BOX_KEYS = ("xmin", "xmax", "ymin", "ymax")

# tensorflow/core/example/{feature,example}.proto, the messages that Example needs.
_EXAMPLE_PROTO = """
name: "detkit/tf_example.proto" package: "tensorflow" syntax: "proto3"
message_type { name: "BytesList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES } }
message_type { name: "FloatList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_FLOAT } }
message_type { name: "Int64List"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64 } }
message_type { name: "Feature"
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.BytesList" oneof_index: 0 }
  field { name: "float_list" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.FloatList" oneof_index: 0 }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.Int64List" oneof_index: 0 }
  oneof_decl { name: "kind" } }
message_type { name: "Features"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".tensorflow.Features.FeatureEntry" }
  nested_type { name: "FeatureEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Feature" } } }
message_type { name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Features" } }
"""


@functools.cache
def example_class():
    """``tf.train.Example``'s message class (built once per process)."""
    pool = descriptor_pool.DescriptorPool()  # private: TensorFlow registers the real file in the default one
    pool.Add(text_format.Parse(_EXAMPLE_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def encode_example(record: dict[str, Any]) -> bytes:
    """Serialise one image's record (see ``detkit.data.examples.load_example``) deterministically."""
    example = example_class()()
    feature = example.features.feature

    def ints(key, values):
        feature[key].int64_list.value.extend(values)

    def floats(key, values):
        feature[key].float_list.value.extend(values)

    def strings(key, values):
        feature[key].bytes_list.value.extend(v if isinstance(v, bytes) else v.encode() for v in values)

    ints("image/height", [record["height"]])
    ints("image/width", [record["width"]])
    strings("image/filename", [record["filename"]])
    strings("image/source_id", [record["filename"]])
    strings("image/key/sha256", [record["sha256"]])
    strings("image/encoded", [record["encoded"]])
    strings("image/format", [b"jpeg"])
    for k in BOX_KEYS:
        floats(f"image/object/bbox/{k}", record[k])
    strings("image/object/class/text", record["text"])
    ints("image/object/class/label", record["label"])
    ints("image/object/difficult", record["difficult"])
    ints("image/object/truncated", record["truncated"])
    strings("image/object/view", record["view"])
    # Map fields serialise in arbitrary order unless asked: byte-identical shards need this.
    return example.SerializeToString(deterministic=True)


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class TFRecordFile:
    """An uncompressed TFRecord file, as ``tf.io.TFRecordWriter`` writes it."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(length + _masked_crc(length) + record + _masked_crc(record))

    def close(self) -> None:
        self._file.close()


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
