"""DVC stage ``export``: the trained model as a SavedModel that TF Serving serves.

Writes ``<out>/<model_name>/<version>/`` (TF Serving's layout) with the TF Object Detection
API exporter's contract (docs/export.md):

- ``serving_default``: input ``inputs``, a batch of encoded JPEG/PNG/GIF bytes of any size up to
  ``export.max_image_pixels`` (``tf.string [-1]``; a larger image is refused from its header,
  before it is decoded: InvalidArgumentError, HTTP 400); outputs ``detection_boxes``
  [-1, M, 4] (normalised ymin, xmin, ymax, xmax), ``detection_classes`` [-1, M] (1-based
  label-map ids, float), ``detection_scores`` [-1, M] (descending), ``num_detections`` [-1],
  all float32, M = ``export.max_detections``;
- optional ``image_tensor`` (uint8 [1, -1, -1, 3]) and ``tf_example`` (serialised
  tf.Example with the docs/tfrecords.md keys) signatures with the same outputs;
- ``assets.extra/label_map.pbtxt`` so clients can name classes, and
  ``assets.extra/export_check.json``: the export check below.

The version is ``export.version`` or one more than the newest; an existing version is never
overwritten. The export check reloads the SavedModel and requires that its detections on val
images equal the in-memory model's as eval computes them (same classes, boxes and scores within
``export.check_tolerance``, compared as sets, so the order of equal scores does not matter) and
that ``saved_model_cli show`` reports exactly the signature above. A failed check is still
written (for inspection, marked failed: ``make deploy`` refuses it) and fails the stage.

    python -m stages.export --checkpoints models/checkpoints --records data/records --out models/export
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from detkit.checkpoints import FINAL
from detkit.cli import run_stage, stage_parser
from detkit.config import ConfigError
from detkit.fsio import EXPORT_CHECK, EXPORT_LABEL_MAP, atomic_dir, versions
from detkit.model import ModelError


class ExportError(RuntimeError):
    """The export exists but fails its check, or cannot be written where asked."""


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


def saved_model_cli_show(path: Path, signature: str) -> dict[str, Any]:
    """``saved_model_cli show`` for one signature, parsed into ``expected_signature``'s shape."""
    cli = Path(sys.executable).with_name("saved_model_cli")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    text = subprocess.run([*command, "show", "--dir", str(path), "--tag_set", "serve", "--signature_def", signature],
                          capture_output=True, text=True, check=True).stdout
    shown: dict[str, Any] = {"inputs": {}, "outputs": {}, "method_name": None}
    for kind, name, dtype, shape in re.findall(r"(inputs|outputs)\['([^']+)'\] tensor_info:\s*dtype: (\w+)\s*"
                                               r"shape: (\([^)]*\))", text):
        shown[kind][name] = [dtype, shape]
    method = re.search(r"Method name is: (\S+)", text)
    shown["method_name"] = method.group(1) if method else None
    return shown


def next_version(model_dir: Path, requested: int | None) -> int:
    existing = versions(model_dir)
    if requested is None:
        return max(existing, default=0) + 1
    if requested in existing:
        raise ExportError(f"{model_dir / str(requested)}: version {requested} exists and is never overwritten; "
                          "set export.version to a new number, or null for the next free one")
    return requested


def serving_functions(detector, decoder, signatures: list[str], max_pixels: int) -> dict[str, tuple[Any, list]]:
    """The SavedModel's signatures (``signatures`` of the ones below): name -> (function, input signature).

    Those that take encoded images refuse one of more than ``max_pixels`` before decoding it.
    """
    import tensorflow as tf

    from detkit import data, model

    size = model.input_size(detector)
    anchors = model.anchors_for(detector, size)
    resized = tf.TensorSpec([size, size, 3], tf.float32)

    def detect(images):
        return model.detect(detector, images, decoder, anchors)

    def from_encoded(encoded):
        # One image at a time: the batch may mix sizes and formats.
        return detect(tf.map_fn(lambda e: data.decode_and_resize(e, size, max_pixels), encoded,
                                fn_output_signature=resized))

    def serving_default(inputs):
        return from_encoded(inputs)

    def image_tensor(inputs):
        return detect(data.resize_image(inputs, size))

    def tf_example(inputs):
        features = tf.io.parse_example(inputs, data.ENCODED)
        return from_encoded(features["image/encoded"])

    strings = [tf.TensorSpec([None], tf.string, name="inputs")]
    functions = {
        "serving_default": (serving_default, strings),
        "image_tensor": (image_tensor, [tf.TensorSpec([1, None, None, 3], tf.uint8, name="inputs")]),
        "tf_example": (tf_example, strings),
    }
    return {name: functions[name] for name in signatures}


def write_savedmodel(detector, decoder, path: Path, signatures: list[str], max_pixels: int) -> None:
    import keras

    archive = keras.export.ExportArchive()
    archive.track(detector)
    for name, (function, signature) in serving_functions(detector, decoder, signatures, max_pixels).items():
        archive.add_endpoint(name, function, input_signature=signature)
    archive.write_out(str(path), verbose=False)


CHECK_BATCH = 4  # images per call in the export check: bounds its memory whatever export.check_images is


def check_export(path: Path, detector, decoder, encoded: list[bytes], tolerance: float,
                 max_detections: int, signatures: list[str]) -> dict[str, Any]:
    """Reloaded SavedModel vs the in-memory model on ``encoded`` images, and its signatures.

    The reference is eval's path (``detkit.model.detection_function``), so what eval measured is
    what TF Serving serves. Detections are compared per image as sets (``compare_detections``):
    which of two equal scores comes first is not a difference.
    """
    import tensorflow as tf

    from detkit import data, model

    size = model.input_size(detector)
    reference = model.detection_function(detector, decoder)
    reloaded = tf.saved_model.load(str(path)).signatures["serving_default"]
    expected: dict[str, list] = {}
    got: dict[str, list] = {}
    for i in range(0, len(encoded), CHECK_BATCH):
        chunk = encoded[i:i + CHECK_BATCH]
        for out, result in ((expected, reference(tf.stack([data.decode_and_resize(e, size) for e in chunk]))),
                            (got, reloaded(inputs=tf.constant(chunk)))):
            for key, value in result.items():
                out.setdefault(key, []).extend(value.numpy())
    parity = compare_detections(expected, got, tolerance, float(decoder.score_threshold), float(decoder.iou_threshold))
    shown = {name: saved_model_cli_show(path, name) for name in signatures}
    wanted = {name: expected_signature(max_detections, name) for name in signatures}
    signature_ok = {name: shown[name] == wanted[name] for name in signatures}
    return {
        "passed": parity["mismatched"] == 0 and all(signature_ok.values()),
        "images": len(encoded),
        "tolerance": tolerance,
        **parity,
        "signatures": {name: {"matches_contract": signature_ok[name], "saved_model_cli": shown[name]}
                       for name in signatures},
    }


def compare_detections(expected: dict[str, list], got: dict[str, list], tolerance: float,
                       score_threshold: float, iou_threshold: float) -> dict[str, Any]:
    """Two runs' detections (TF OD API outputs, per image), compared independently of order.

    A detection matches one of the other run with the same class, score and box (each
    coordinate) within ``tolerance``. One left without a match is a near tie, not a
    difference, when rounding alone explains it: the other run kept, instead, an overlapping
    box (IoU >= ``iou_threshold``) of the same class whose score is within ``tolerance`` (two
    near-equal candidates that NMS chose between differently), or its score is within
    ``tolerance`` of ``score_threshold`` (kept by one run only). Anything else is a mismatch.
    """
    import numpy as np

    matched = near_ties = mismatched = 0
    largest = {"detection_boxes": 0.0, "detection_scores": 0.0}
    for i in range(len(expected["num_detections"])):
        (e_boxes, e_scores, e_classes), (g_boxes, g_scores, g_classes) = (
            (np.asarray(run["detection_boxes"][i][:n]), np.asarray(run["detection_scores"][i][:n]),
             np.asarray(run["detection_classes"][i][:n]))
            for run in (expected, got) for n in [int(run["num_detections"][i])])
        same_class = e_classes[:, None] == g_classes[None, :]
        box_gap = np.abs(e_boxes[:, None, :] - g_boxes[None, :, :]).max(axis=-1, initial=0.0)
        score_gap = np.abs(e_scores[:, None] - g_scores[None, :])
        fits = same_class & (box_gap <= tolerance) & (score_gap <= tolerance)
        e_free, g_free = np.ones(len(e_scores), bool), np.ones(len(g_scores), bool)
        for a in np.argsort(-e_scores, kind="stable"):
            candidates = np.flatnonzero(fits[a] & g_free)
            if candidates.size:
                b = candidates[np.argmin(box_gap[a, candidates])]
                e_free[a], g_free[b] = False, False
                matched += 1
                largest["detection_boxes"] = max(largest["detection_boxes"], float(box_gap[a, b]))
                largest["detection_scores"] = max(largest["detection_scores"], float(score_gap[a, b]))
        rival = (same_class & (score_gap <= tolerance) & (_iou(e_boxes, g_boxes) >= iou_threshold)
                 & e_free[:, None] & g_free[None, :])
        for scores, free, rivals in ((e_scores, e_free, rival.any(axis=1)), (g_scores, g_free, rival.any(axis=0))):
            tie = rivals | (np.abs(scores - score_threshold) <= tolerance)
            near_ties += int(np.sum(free & tie))
            mismatched += int(np.sum(free & ~tie))
    return {"matched": matched, "near_ties": near_ties, "mismatched": mismatched, "max_abs_difference": largest}


def _iou(a, b):
    """IoU of every normalised yxyx box in ``a`` with every one in ``b`` (pycocotools)."""
    import numpy as np
    from pycocotools import mask

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))

    def xywh(boxes):
        return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1)

    return np.asarray(mask.iou(xywh(a).astype(float), xywh(b).astype(float), [0] * len(b)))


def val_images(records: Path, count: int) -> list[bytes]:
    from detkit import data

    images = data.encoded_images(records, "val", count)
    if not images:
        raise ConfigError(f"{records}: no val images for the export check (see split.train_fraction)")
    return images


def run(cfg: DictConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict[str, Any]:
    """Export ``inputs['checkpoints']/final`` to ``outputs['export']/<model_name>/<version>``."""
    from detkit import model

    e = cfg.export
    model_dir = Path(outputs["export"]) / e.model_name
    # The cheap checks that can refuse first, then the model load.
    version = next_version(model_dir, e.version)
    encoded = val_images(Path(inputs["records"]), e.check_images)
    trained = Path(inputs["checkpoints"]) / FINAL
    detector, info = model.load_trained(trained)
    decoder = model.make_decoder(detector, info.get("detection"), max_detections=e.max_detections)
    signatures = ["serving_default", *e.extra_signatures]
    final = model_dir / str(version)
    with atomic_dir(final) as tmp:
        write_savedmodel(detector, decoder, tmp, signatures, e.max_image_pixels)
        check = check_export(tmp, detector, decoder, encoded, e.check_tolerance, e.max_detections, signatures)
        check.update(version=version, model_name=e.model_name, step=info.get("step"),
                     max_image_pixels=e.max_image_pixels)
        (tmp / EXPORT_CHECK).parent.mkdir()
        shutil.copyfile(trained / model.LABEL_MAP_FILE, tmp / EXPORT_LABEL_MAP)
        (tmp / EXPORT_CHECK).write_text(json.dumps(check, indent=2) + "\n")
    diff = max(check["max_abs_difference"].values())
    print(f"export: wrote {final} (signatures: {', '.join(signatures)}); export check "
          f"{'passed' if check['passed'] else 'FAILED'} on {check['images']} val images: {check['matched']} detections "
          f"match (largest box/score difference {diff:.2g}, tolerance {e.check_tolerance:g}), "
          f"{check['near_ties']} near ties, {check['mismatched']} mismatched; signatures as docs/export.md: "
          f"{all(s['matches_contract'] for s in check['signatures'].values())}")
    if not check["passed"]:
        raise ExportError(f"{final / EXPORT_CHECK}: the export check failed; the version is kept for "
                          "inspection and make deploy refuses it")
    return {"path": str(final), "version": version, "check": check}


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("stages.export", __doc__)
    parser.add_argument("--checkpoints", type=Path, required=True, help="train stage output (uses its final/)")
    parser.add_argument("--records", type=Path, required=True, help="tfrecord stage output (val images)")
    parser.add_argument("--out", type=Path, required=True, help="export base folder (<out>/<model_name>/<version>)")

    def call(cfg, args):
        return run(cfg, {"checkpoints": args.checkpoints, "records": args.records}, {"export": args.out})

    return run_stage(parser, argv, call, errors=(ExportError, ModelError))


if __name__ == "__main__":
    sys.exit(main())
