"""COCO detection metrics with pycocotools semantics.

Ground truth and detections come in as normalised ``[ymin, xmin, ymax, xmax]`` boxes
(the TF OD API convention used everywhere in this project) and are converted to COCO's
absolute ``[x, y, width, height]`` here, once. Two interchangeable backends:
``pycocotools`` (the reference) and ``faster_coco_eval`` (same algorithm in C++, several
times faster on thousands of images; ``tests/test_coco.py`` shows identical numbers).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The 12 numbers of COCOeval.summarize(), in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("faster_coco_eval", "pycocotools")


@dataclass
class ImageResult:
    """One image: its size, true boxes/labels, and the detector's boxes/classes/scores."""

    image_id: int
    width: int
    height: int
    gt_boxes: np.ndarray  # [n, 4] normalised ymin, xmin, ymax, xmax
    gt_labels: np.ndarray  # [n] 1-based label-map ids
    boxes: np.ndarray  # [m, 4] normalised ymin, xmin, ymax, xmax
    classes: np.ndarray  # [m] 1-based label-map ids
    scores: np.ndarray  # [m]


def _xywh(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ymin, xmin, ymax, xmax = (boxes[:, i] for i in range(4))
    return np.stack([xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height], axis=1)


def to_coco(results: list[ImageResult], label_map: dict[int, str]) -> tuple[dict, list[dict]]:
    """COCO ground-truth dataset dict and detection list."""
    images, annotations, detections = [], [], []
    for r in results:
        images.append({"id": r.image_id, "width": r.width, "height": r.height})
        for box, label in zip(_xywh(r.gt_boxes, r.width, r.height), r.gt_labels):
            annotations.append({"id": len(annotations) + 1, "image_id": r.image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})
        for box, label, score in zip(_xywh(r.boxes, r.width, r.height), r.classes, r.scores):
            detections.append({"image_id": r.image_id, "category_id": int(label),
                               "bbox": box.tolist(), "score": float(score)})
    categories = [{"id": i, "name": name} for i, name in sorted(label_map.items())]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _coco_eval(gt: dict, detections: list[dict], backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    elif backend == "faster_coco_eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        raise ValueError(f"unknown COCO backend '{backend}': use one of {', '.join(BACKENDS)}")
    with contextlib.redirect_stdout(io.StringIO()):  # both print progress chatter
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections) if detections else COCO()
        if not detections:  # loadRes refuses an empty list; nothing detected scores 0
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def evaluate(results: list[ImageResult], label_map: dict[int, str], backend: str = "faster_coco_eval") -> dict:
    """COCO AP/AR family, per-class AP and the PR curve at IoU 0.5 (all areas, 100 dets).

    A class with no ground truth gets AP null (pycocotools' -1), not zero.
    """
    gt, detections = to_coco(results, label_map)
    evaluator = _coco_eval(gt, detections, backend)
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    # precision: [iou thresholds, recall points, classes, area ranges, max dets]
    precision = np.asarray(evaluator.eval["precision"])
    cat_ids = list(evaluator.params.catIds)
    per_class = {}
    for k, class_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        per_class[label_map[class_id]] = float(p[p > -1].mean()) if (p > -1).any() else None
    at50 = precision[0, :, :, 0, -1]
    curve = [
        {"recall": float(r), "precision": float(col[col > -1].mean()) if (col > -1).any() else 0.0}
        for r, col in zip(evaluator.params.recThrs, at50)
    ]
    return {"metrics": stats, "per_class_ap": per_class, "pr_curve": curve}


def predict_split(detect, input_size: int, records: Path, batch_size: int,
                  with_encoded: bool = True) -> tuple[list[ImageResult], dict[int, bytes]]:
    """Detections of ``detect`` (``detkit.models.retinanet.detection_function``) for every val image, and with
    ``with_encoded`` the encoded images (by image id) for drawing."""
    from detkit.data import pipeline as data  # TensorFlow: only where a model runs

    results, encoded = [], {}
    for batch in data.eval_dataset(records, input_size, batch_size, with_encoded=with_encoded):
        out = {k: v.numpy() for k, v in detect(batch["images"]).items()}
        for i in range(len(batch["height"])):
            n_gt, n_det = int(batch["num_boxes"][i]), int(out["num_detections"][i])
            image_id = len(results) + 1
            results.append(ImageResult(
                image_id=image_id,
                width=int(batch["width"][i]),
                height=int(batch["height"][i]),
                gt_boxes=batch["boxes"][i][:n_gt].numpy(),
                gt_labels=batch["labels"][i][:n_gt].numpy(),
                boxes=out["detection_boxes"][i][:n_det],
                classes=out["detection_classes"][i][:n_det].astype(int),
                scores=out["detection_scores"][i][:n_det],
            ))
            if with_encoded:
                encoded[image_id] = batch["encoded"][i].numpy()
    return results, encoded
