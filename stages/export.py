"""DVC stage ``export``: the trained model as a SavedModel that TF Serving serves.

Writes ``<out>/<model_name>/<version>/`` (TF Serving's layout) with the TF Object Detection
API exporter's contract (DESIGN 4.3):

- ``serving_default``: input ``inputs``, a batch of encoded JPEG/PNG/GIF bytes of any size
  (``tf.string [-1]``); outputs ``detection_boxes`` [-1, M, 4] (normalised ymin, xmin, ymax,
  xmax), ``detection_classes`` [-1, M] (1-based label-map ids, float), ``detection_scores``
  [-1, M] (descending), ``num_detections`` [-1], all float32, M = ``export.max_detections``;
- optional ``image_tensor`` (uint8 [1, -1, -1, 3]) and ``tf_example`` (serialised
  tf.Example with the DESIGN 4.2 keys) signatures with the same outputs;
- ``assets.extra/label_map.pbtxt`` so clients can name classes, and
  ``assets.extra/export_check.json``: the export check below.

The version is ``export.version`` or one more than the newest; an existing version is never
overwritten. The export check reloads the SavedModel and requires that its outputs equal the
in-memory model's on val images (within ``export.check_tolerance``) and that
``saved_model_cli show`` reports exactly the signature above. A failed check is still
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

from detkit.cli import run_stage, stage_parser
from detkit.config import ConfigError
from detkit.fsio import EXPORT_CHECK, EXPORT_LABEL_MAP, atomic_dir, versions
from detkit.model import ModelError
from stages.train import FINAL


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


def serving_functions(detector, decoder, signatures: list[str]) -> dict[str, tuple[Any, list]]:
    """The SavedModel's signatures (``signatures`` of the ones below): name -> (function, input signature)."""
    import tensorflow as tf

    from detkit import data, model

    size = model.input_size(detector)
    anchors = model.anchors_for(detector, size)
    resized = tf.TensorSpec([size, size, 3], tf.float32)

    def detect(images):
        return model.detect(detector, images, decoder, anchors)

    def from_encoded(encoded):
        # One image at a time: the batch may mix sizes and formats.
        return detect(tf.map_fn(lambda e: data.decode_and_resize(e, size), encoded, fn_output_signature=resized))

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


def write_savedmodel(detector, decoder, path: Path, signatures: list[str]) -> None:
    import keras

    archive = keras.export.ExportArchive()
    archive.track(detector)
    for name, (function, signature) in serving_functions(detector, decoder, signatures).items():
        archive.add_endpoint(name, function, input_signature=signature)
    archive.write_out(str(path), verbose=False)


def check_export(path: Path, detector, decoder, encoded: list[bytes], tolerance: float,
                 max_detections: int, signatures: list[str]) -> dict[str, Any]:
    """Reloaded SavedModel vs the in-memory model on ``encoded`` images, and its signatures."""
    import numpy as np
    import tensorflow as tf

    from detkit import data, model

    size = model.input_size(detector)
    images = tf.stack([data.decode_and_resize(e, size) for e in encoded])
    expected = {k: v.numpy() for k, v in model.detect(detector, images, decoder).items()}
    reloaded = tf.saved_model.load(str(path)).signatures["serving_default"]
    got = {k: v.numpy() for k, v in reloaded(inputs=tf.constant(encoded)).items()}
    same_counts = bool(np.array_equal(got["num_detections"], expected["num_detections"]))
    same_classes = bool(np.array_equal(got["detection_classes"], expected["detection_classes"]))
    differences = {k: float(np.max(np.abs(got[k] - expected[k]))) for k in ("detection_boxes", "detection_scores")}
    shown = {name: saved_model_cli_show(path, name) for name in signatures}
    wanted = {name: expected_signature(max_detections, name) for name in signatures}
    signature_ok = {name: shown[name] == wanted[name] for name in signatures}
    passed = same_counts and same_classes and max(differences.values()) <= tolerance and all(signature_ok.values())
    return {
        "passed": passed,
        "images": len(encoded),
        "tolerance": tolerance,
        "max_abs_difference": differences,
        "num_detections_equal": same_counts,
        "detection_classes_equal": same_classes,
        "signatures": {name: {"matches_design": signature_ok[name], "saved_model_cli": shown[name]}
                       for name in signatures},
    }


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
        write_savedmodel(detector, decoder, tmp, signatures)
        check = check_export(tmp, detector, decoder, encoded, e.check_tolerance, e.max_detections, signatures)
        check.update(version=version, model_name=e.model_name, step=info.get("step"))
        (tmp / EXPORT_CHECK).parent.mkdir()
        shutil.copyfile(trained / model.LABEL_MAP_FILE, tmp / EXPORT_LABEL_MAP)
        (tmp / EXPORT_CHECK).write_text(json.dumps(check, indent=2) + "\n")
    diff = max(check["max_abs_difference"].values())
    print(f"export: wrote {final} (signatures: {', '.join(signatures)}); export check "
          f"{'passed' if check['passed'] else 'FAILED'}: {check['images']} val images, largest box/score "
          f"difference {diff:.2g} (tolerance {e.check_tolerance:g}), signatures as DESIGN 4.3: "
          f"{all(s['matches_design'] for s in check['signatures'].values())}")
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
