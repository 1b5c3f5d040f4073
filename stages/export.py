"""DVC stage ``export``: the trained model as a SavedModel that TF Serving serves.

Writes ``<out>/<model_name>/<version>/`` (TF Serving's layout) with the TF Object Detection
API exporter's contract (docs/export.md):

- ``serving_default``: input ``inputs``, a batch of encoded JPEG/PNG/GIF/BMP/WebP bytes within
  ``export.max_image_pixels`` and ``export.max_jpeg_scans`` (``tf.string [-1]``; an image over them
  is refused from its bytes before it is decoded: InvalidArgumentError, HTTP 400); outputs ``detection_boxes``
  [-1, M, 4] (normalised ymin, xmin, ymax, xmax), ``detection_classes`` [-1, M] (1-based
  label-map ids, float), ``detection_scores`` [-1, M] (descending), ``num_detections`` [-1],
  all float32, M = ``export.max_detections``;
- optional ``image_tensor`` (uint8 [1, -1, -1, 3]) and ``tf_example`` (serialised
  tf.Example with the docs/tfrecords.md keys) signatures with the same outputs;
- ``assets.extra/label_map.pbtxt`` so clients can name classes, and
  ``assets.extra/export_check.json``: the export check below.

The signatures run the trained model's family ``detect`` (``detkit.serve.signatures``). The version
is ``export.version`` or one more than the newest; an existing version is never overwritten. The
export check (``detkit.serve.export_check``) reloads the SavedModel and requires that its
detections on val images equal the in-memory model's as eval computes them (same classes, boxes and
scores within ``export.check_tolerance``, compared as sets; near ties that rounding explains
bounded) and that ``saved_model_cli show``
reports exactly the signatures above. A failed check is still
written (for inspection, marked failed: ``make deploy`` refuses it) and fails the stage.

    python -m stages.export --checkpoints models/checkpoints --records data/records --out models/export
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from detkit.config import ConfigError
from detkit.config.cli import command_parser, run_stage
from detkit.core.fsio import EXPORT_CHECK, EXPORT_LABEL_MAP, atomic_dir, versions
from detkit.models.family import LABEL_MAP_FILE, ModelError
from detkit.train.checkpoints import FINAL


class ExportError(RuntimeError):
    """The export exists but fails its check, or cannot be written where asked."""


def next_version(model_dir: Path, requested: int | None) -> int:
    existing = versions(model_dir)
    if requested is None:
        return max(existing, default=0) + 1
    if requested in existing:
        raise ExportError(f"{model_dir / str(requested)}: version {requested} exists and is never overwritten; "
                          "set export.version to a new number, or null for the next free one")
    return requested


def run(cfg: DictConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict[str, Any]:
    """Export ``inputs['checkpoints']/final`` to ``outputs['export']/<model_name>/<version>``."""
    from detkit.data import pipeline  # TensorFlow: after the cheap checks below
    from detkit.data.images import ImageLimits
    from detkit.models import family
    from detkit.serve.export_check import check_export
    from detkit.serve.signatures import write_savedmodel

    e = cfg.export
    model_dir = Path(outputs["export"]) / e.model_name
    # The cheap checks that can refuse first, then the model load.
    version = next_version(model_dir, e.version)
    records = Path(inputs["records"])
    encoded = pipeline.encoded_images(records, "val", e.check_images)
    if not encoded:
        raise ConfigError(f"{records}: no val images for the export check (see split.train_fraction)")
    trained = Path(inputs["checkpoints"]) / FINAL
    fam, detector, info = family.load_trained(trained)
    size, detection = int(info["image_size"]), info["detection"]
    signatures = ["serving_default", *e.extra_signatures]
    final = model_dir / str(version)
    with atomic_dir(final) as tmp:
        write_savedmodel(fam, detector, size, detection, e.max_detections, tmp, signatures, ImageLimits.of(e))
        reference = family.detection_function(fam, detector, size, detection, e.max_detections)
        check = check_export(tmp, reference, size, detection, encoded, e.check_tolerance, e.max_detections,
                             signatures)
        check.update(version=version, model_name=e.model_name, step=info.get("step"),
                     max_image_pixels=e.max_image_pixels, max_jpeg_scans=e.max_jpeg_scans)
        (tmp / EXPORT_CHECK).parent.mkdir()
        shutil.copyfile(trained / LABEL_MAP_FILE, tmp / EXPORT_LABEL_MAP)
        (tmp / EXPORT_CHECK).write_text(json.dumps(check, indent=2) + "\n")
    diff = max(check["max_abs_difference"].values())
    print(f"export: wrote {final} (signatures: {', '.join(signatures)}); export check "
          f"{'passed' if check['passed'] else 'FAILED'} on {check['images']} val images: {check['matched']} detections "
          f"match (largest box/score difference {diff:.2g}, tolerance {e.check_tolerance:g}), "
          f"{check['near_ties']} near ties ({check['near_tie_share']:.1%} of the detections, at most "
          f"{check['max_near_tie_share']:.0%}), {check['mismatched']} mismatched; signatures as docs/export.md: "
          f"{all(s['matches_contract'] for s in check['signatures'].values())}")
    if not check["passed"]:
        raise ExportError(f"{final / EXPORT_CHECK}: the export check failed; the version is kept for "
                          "inspection and make deploy refuses it")
    return {"path": str(final), "version": version, "check": check}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("stages.export", __doc__)
    parser.add_argument("--checkpoints", type=Path, required=True, help="train stage output (uses its final/)")
    parser.add_argument("--records", type=Path, required=True, help="tfrecord stage output (val images)")
    parser.add_argument("--out", type=Path, required=True, help="export base folder (<out>/<model_name>/<version>)")

    def call(cfg, args):
        return run(cfg, {"checkpoints": args.checkpoints, "records": args.records}, {"export": args.out})

    return run_stage(parser, argv, call, errors=(ExportError, ModelError))


if __name__ == "__main__":
    sys.exit(main())
