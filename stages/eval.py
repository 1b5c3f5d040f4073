"""DVC stage ``eval``: COCO metrics of the trained model on the val split.

Runs the trained model (``models/checkpoints/final``, any family) with the same resize and
detection decoding as the exported model, and writes

- ``metrics/eval.json``: the 12 COCO numbers (AP, AP50, AP75, APs/m/l, AR1/10/100,
  ARs/m/l), the image count, the training step, the model's parameter count and the images/s its
  training ran at: DVC metrics, shown by ``dvc exp show`` and ``make compare``;
- ``metrics/per_class_ap.json``: AP per class name (null for a class absent from val);
- ``plots/pr_curve.json``: precision at each recall point, IoU 0.5, averaged over classes;
- ``plots/eval_samples/*.png``: val images with true (green, label below) and predicted
  (red, label above) boxes named by class.

and logs the metrics and the plots to the training's MLflow run (``mlflow_run.json`` in the
checkpoints folder), so one run holds both.

    python -m stages.eval --records data/records --checkpoints models/checkpoints \
        --metrics metrics --plots plots
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from detkit.config import ConfigError
from detkit.config.cli import command_parser, run_stage
from detkit.core.fsio import atomic_dir, atomic_write_bytes, atomic_write_json
from detkit.data.labelmap import read_label_map
from detkit.eval.coco import ImageResult, evaluate, predict_split
from detkit.eval.draw import PREDICTED, TRUE, Boxes, detection_labels, draw_boxes
from detkit.models import family
from detkit.train import tracking
from detkit.train.checkpoints import FINAL, RUN_FILE


def draw_samples(results: list[ImageResult], encoded: dict[int, bytes], label_map: dict[int, str],
                 count: int, min_score: float, out: Path) -> list[Path]:
    """Up to ``count`` val images, spread over the split, with true and predicted boxes."""
    picks = np.linspace(0, len(results) - 1, num=min(count, len(results)), dtype=int) if results else []
    written = []
    for index in sorted(set(picks)):
        r = results[index]
        image = Image.open(io.BytesIO(encoded[r.image_id])).convert("RGB")
        keep = r.scores >= min_score
        # The truth over the predictions, thin: a good prediction on top would hide it.
        draw_boxes(image, Boxes(r.boxes[keep], detection_labels(r.classes[keep], r.scores[keep], label_map), PREDICTED),
                   Boxes(r.gt_boxes, [label_map[int(c)] for c in r.gt_labels], TRUE, label_below=True, thin=True))
        path = out / f"val_{r.image_id:05d}.png"
        image.save(path)
        written.append(path)
    return written


def run(cfg: DictConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict[str, Any]:
    """Evaluate ``inputs['checkpoints']/final`` on ``inputs['records']`` val shards."""
    records, checkpoints = Path(inputs["records"]), Path(inputs["checkpoints"])
    fam, detector, info = family.load_trained(checkpoints / FINAL)
    size = int(info["image_size"])
    label_map = read_label_map(records / family.LABEL_MAP_FILE)
    results, encoded = predict_split(family.detection_function(fam, detector, size, info["detection"]), size,
                                     records, cfg.eval.batch_size)
    if not results:
        raise ConfigError(f"{records}: the val split is empty; nothing to evaluate (see split.train_fraction)")
    coco = evaluate(results, label_map, backend=cfg.eval.coco_backend)
    metrics = {**coco["metrics"], "num_images": len(results), "step": int(info.get("step", 0)),
               "parameters": int(detector.count_params()),
               "train_images_per_second": info.get("train_images_per_second")}

    metrics_dir, plots_dir = Path(outputs["metrics"]), Path(outputs["plots"])
    atomic_write_json(metrics_dir / "eval.json", metrics)
    atomic_write_json(metrics_dir / "per_class_ap.json", coco["per_class_ap"])
    atomic_write_bytes(plots_dir / "pr_curve.json", (json.dumps(coco["pr_curve"]) + "\n").encode())
    with atomic_dir(plots_dir / "eval_samples") as tmp:
        draw_samples(results, encoded, label_map, cfg.eval.num_samples, cfg.eval.sample_min_score, tmp)
    samples = sorted((plots_dir / "eval_samples").iterdir())
    per_class = {name: ap for name, ap in coco["per_class_ap"].items() if ap is not None}
    tracking.log_to_run(checkpoints / RUN_FILE, per_class, [], "eval", prefix="eval_ap/")
    run_id = tracking.log_to_run(checkpoints / RUN_FILE, coco["metrics"],
                                 [metrics_dir / "eval.json", metrics_dir / "per_class_ap.json",
                                  plots_dir / "pr_curve.json", *samples], "eval", prefix="eval/")
    m = coco["metrics"]
    print(f"eval: {len(results)} val images: AP {m['AP']:.3f}  AP50 {m['AP50']:.3f}  AP75 {m['AP75']:.3f}  "
          f"AR100 {m['AR100']:.3f}" + (f"; logged to MLflow run {run_id}" if run_id else ""))
    return {"metrics": metrics, "per_class_ap": coco["per_class_ap"], "samples": [str(p) for p in samples],
            "mlflow_run_id": run_id}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("stages.eval", __doc__)
    parser.add_argument("--records", type=Path, required=True, help="tfrecord stage output")
    parser.add_argument("--checkpoints", type=Path, required=True, help="train stage output")
    parser.add_argument("--metrics", type=Path, required=True, help="folder for eval.json, per_class_ap.json")
    parser.add_argument("--plots", type=Path, required=True, help="folder for pr_curve.json, eval_samples/")

    def call(cfg, args):
        return run(cfg, {"records": args.records, "checkpoints": args.checkpoints},
                   {"metrics": args.metrics, "plots": args.plots})

    return run_stage(parser, argv, call, errors=(family.ModelError,))


if __name__ == "__main__":
    sys.exit(main())
