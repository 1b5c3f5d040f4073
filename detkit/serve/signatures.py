"""The exported SavedModel's signatures (docs/export.md): the TF Object Detection API exporter's
contract around any family's ``detect``, and what ``saved_model_cli show`` must report of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from detkit.data import pipeline
from detkit.data.images import ImageLimits
from detkit.models.family import Family


def expected_signature(max_detections: int, input_type: str = "serving_default") -> dict[str, Any]:
    """The signature as ``saved_model_cli show`` prints it: name -> [dtype, shape]."""
    if input_type == "image_tensor":  # one image per call, so the batch is static
        batch, inputs = "1", ["DT_UINT8", "(1, -1, -1, 3)"]
    else:
        batch, inputs = "-1", ["DT_STRING", "(-1)"]
    m = max_detections
    return {
        "inputs": {"inputs": inputs},
        "outputs": {
            "detection_boxes": ["DT_FLOAT", f"({batch}, {m}, 4)"],
            "detection_classes": ["DT_FLOAT", f"({batch}, {m})"],
            "detection_scores": ["DT_FLOAT", f"({batch}, {m})"],
            "num_detections": ["DT_FLOAT", f"({batch})"],
        },
        "method_name": "tensorflow/serving/predict",
    }


def saved_model_cli_show(path: Path) -> dict[str, dict[str, Any]]:
    """Every signature of the SavedModel at ``path`` as ``saved_model_cli show --tag_set serve
    --signature_def <name>`` prints it, in ``expected_signature``'s shape: read once from the
    ``saved_model.pb`` fields the CLI prints, in this process (the CLI is a second Python that imports
    TensorFlow again, seconds a signature). test_signatures.py holds this equal to the CLI's output."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    served = next(meta for meta in saved.meta_graphs if set(meta.meta_info_def.tags) == {"serve"})

    def tensor(info) -> list[str]:
        shape = info.tensor_shape
        dims = "unknown_rank" if shape.unknown_rank else f"({', '.join(str(d.size) for d in shape.dim)})"
        return [types_pb2.DataType.Name(info.dtype), dims]

    return {name: {"inputs": {key: tensor(info) for key, info in definition.inputs.items()},
                   "outputs": {key: tensor(info) for key, info in definition.outputs.items()},
                   "method_name": definition.method_name or None}
            for name, definition in served.signature_def.items()}


def serving_functions(detect, size: int, signatures: list[str], limits: ImageLimits) -> dict[str, tuple[Any, list]]:
    """The SavedModel's signatures (``signatures`` of the ones below): name -> (function, input signature).

    ``detect``: resized images float32 [B, size, size, 3] -> TF OD API outputs (the family's
    ``detect``). Those that take encoded images refuse one over ``limits`` before decoding it.
    """
    resized = tf.TensorSpec([size, size, 3], tf.float32)

    def from_encoded(encoded):
        # One image at a time: the batch may mix sizes and formats.
        return detect(tf.map_fn(lambda e: pipeline.decode_and_resize(e, size, limits), encoded,
                                fn_output_signature=resized))

    def serving_default(inputs):
        return from_encoded(inputs)

    def image_tensor(inputs):
        return detect(pipeline.resize_image(inputs, size))

    def tf_example(inputs):
        features = tf.io.parse_example(inputs, pipeline.ENCODED)
        return from_encoded(features["image/encoded"])

    strings = [tf.TensorSpec([None], tf.string, name="inputs")]
    functions = {
        "serving_default": (serving_default, strings),
        "image_tensor": (image_tensor, [tf.TensorSpec([1, None, None, 3], tf.uint8, name="inputs")]),
        "tf_example": (tf_example, strings),
    }
    return {name: functions[name] for name in signatures}


def write_savedmodel(fam: Family, model, size: int, detection: dict[str, Any], max_detections: int, path: Path,
                     signatures: list[str], limits: ImageLimits) -> None:
    """``model`` as a SavedModel at ``path`` whose ``signatures`` run ``fam.detect`` (``serving_functions``)."""
    def detect(images):
        return fam.detect(model, images, detection, max_detections)

    # Each signature traced once and saved as that concrete function, its variables tracked by the root.
    # Keras' ExportArchive traces each endpoint twice: to list its variables, then inside
    # tf.saved_model.save, whose save options are part of tf.function's cache key (D-FINE tiny: 7 s each).
    concrete = {name: tf.function(function, input_signature=signature, autograph=False).get_concrete_function()
                for name, (function, signature) in serving_functions(detect, size, signatures, limits).items()}
    root = tf.Module()
    root.variables_read = list({id(v): v for f in concrete.values() for v in f.variables}.values())
    tf.saved_model.save(root, str(path), signatures=concrete)
