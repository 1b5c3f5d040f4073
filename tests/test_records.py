"""detkit.data.records serialises tf.train.Example without TensorFlow: TensorFlow's own
serialisation of the same features must give the very same bytes."""

import tensorflow as tf

from detkit.data.records import BOX_KEYS, TFRecordFile, encode_example, feature_spec

RECORD = {
    "height": 375, "width": 500, "filename": "Abyssinian_1.jpg", "sha256": "ab" * 32,
    "encoded": bytes(range(256)) * 40,
    "xmin": [0.1, 0.5], "xmax": [0.4, 0.9], "ymin": [0.2, 0.25], "ymax": [0.6, 0.75],
    "text": ["Abyssinian", "Abyssinian"], "label": [1, 1], "difficult": [0, 1], "truncated": [0, 0],
    "view": ["Frontal", ""],
}


def _tensorflow_example(record) -> bytes:
    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def strings(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v if isinstance(v, bytes) else v.encode()
                                                                      for v in values]))

    feature = {
        "image/height": ints([record["height"]]), "image/width": ints([record["width"]]),
        "image/filename": strings([record["filename"]]), "image/source_id": strings([record["filename"]]),
        "image/key/sha256": strings([record["sha256"]]), "image/encoded": strings([record["encoded"]]),
        "image/format": strings(["jpeg"]),
        **{f"image/object/bbox/{k}": tf.train.Feature(float_list=tf.train.FloatList(value=record[k]))
           for k in BOX_KEYS},
        "image/object/class/text": strings(record["text"]), "image/object/class/label": ints(record["label"]),
        "image/object/difficult": ints(record["difficult"]), "image/object/truncated": ints(record["truncated"]),
        "image/object/view": strings(record["view"]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def test_bytes_equal_tensorflows_own_example():
    assert encode_example(RECORD) == _tensorflow_example(RECORD)


def test_parses_with_the_od_api_spec():
    parsed = {key: tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value
              for key, value in tf.io.parse_single_example(encode_example(RECORD), feature_spec()).items()}
    values = {key: value.numpy().tolist() if value.shape.rank else value.numpy() for key, value in parsed.items()}
    assert values == {
        "image/height": 375, "image/width": 500, "image/filename": b"Abyssinian_1.jpg",
        "image/source_id": b"Abyssinian_1.jpg", "image/key/sha256": b"ab" * 32, "image/encoded": RECORD["encoded"],
        "image/format": b"jpeg", "image/object/class/text": [b"Abyssinian", b"Abyssinian"],
        "image/object/class/label": [1, 1], "image/object/difficult": [0, 1], "image/object/truncated": [0, 0],
        "image/object/view": [b"Frontal", b""],
        # as float32 holds them
        **{f"image/object/bbox/{k}": [float(tf.constant(v, tf.float32)) for v in RECORD[k]] for k in BOX_KEYS}}


def test_tfrecord_file_is_byte_identical_to_tensorflows_writer(tmp_path):
    records = [encode_example(RECORD), b"", b"x" * 70_000]
    ours = TFRecordFile(tmp_path / "ours.tfrecord")
    for record in records:
        ours.write(record)
    ours.close()
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
    read_back = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))]
    assert read_back == records
