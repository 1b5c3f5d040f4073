"""DVC stage ``tfrecord``: raw images + annotations -> train/val TFRecord shards.

Splits trainval rows as the TF OD API pets tool does (seeded shuffle, first ``train_fraction`` to
train; ``detkit.data.annotations``), judges every file by its bytes rather than its name, and
writes TF OD API examples in parallel shards (``detkit.data.examples``), ``label_map.pbtxt`` and
``stats.json`` listing every repair and skip. Never imports TensorFlow.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from detkit.config.cli import command_parser, run_stage
from detkit.core.fsio import atomic_dir, atomic_write_json
from detkit.data.annotations import (
    IMAGE_SUFFIXES,
    DatasetError,
    file_names,
    find_image,
    ignored_reason,
    list_pets,
    list_voc,
    split_rows,
)
from detkit.data.examples import ShardJob, Task, default_workers, shard_mapper, shard_names, write_shard
from detkit.data.labelmap import write_label_map


def run(cfg, inputs: dict[str, Path], outputs: dict[str, Path], workers: int | None = None) -> dict[str, Any]:
    """Build ``outputs["records"]`` (shards, label_map.pbtxt, stats.json) from ``inputs["raw"]``."""
    started = time.perf_counter()
    raw, out = Path(inputs["raw"]), Path(outputs["records"])
    if cfg.dataset.layout == "pets":
        rows, listed, label_map = list_pets(raw)
    else:
        rows, listed, label_map = list_voc(raw, cfg.dataset.label_map)
    ids = {name: i for i, name in label_map.items()}
    images, xmls = raw / "images", raw / "annotations" / "xmls"

    stats: dict[str, Any] = {
        "dataset": cfg.dataset.name,
        "layout": cfg.dataset.layout,
        "num_classes": len(label_map),
        "splits": {},
        "repaired": [],
        "skipped": [],
        "ignored": [],
    }
    splits = dict(zip(("train", "val"), split_rows(rows, cfg.split.train_fraction, cfg.split.seed)))
    names_of = {split: shard_names(split, cfg.tfrecord[f"{split}_shards"]) for split in splits}
    tasks: dict[str, list[Task]] = {split: [] for split in splits}
    shard_tasks: dict[str, list[Task]] = {name: [] for names in names_of.values() for name in names}
    image_names, xml_names = file_names(images), file_names(xmls)
    for split, split_rows_ in splits.items():
        for position, (stem, class_name) in enumerate(split_rows_):
            image = find_image(image_names, stem)
            if image is None:
                stats["skipped"].append({"file": f"images/{stem}.jpg", "split": split, "reason": "image file missing"})
            elif f"{stem}.xml" not in xml_names:
                stats["skipped"].append({"file": f"images/{image}", "split": split,
                                         "reason": "no XML annotation (no head box)"})
            else:
                task = Task(os.path.join(images, image), os.path.join(xmls, f"{stem}.xml"), f"images/{image}",
                            f"annotations/xmls/{stem}.xml", class_name)
                tasks[split].append(task)
                # Row position modulo shard count, skipped rows included, as the TF OD API pets tool.
                names = names_of[split]
                shard_tasks[names[position % len(names)]].append(task)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        # Biggest first: the last job to start is a short one, so the processes finish together.
        jobs = sorted((ShardJob(str(tmp / name), shard_tasks[name]) for name in shard_tasks),
                      key=lambda job: -len(job.tasks))
        results: dict[Task, dict[str, Any]] = {}
        total = sum(len(job.tasks) for job in jobs)
        with (tqdm(total=total, desc="tfrecord", unit="img") as progress,
              shard_mapper(min(workers or default_workers(), len(jobs))) as map_jobs):
            finished = map_jobs(functools.partial(write_shard, class_ids=ids), jobs)
            for path, job_results in finished:
                results.update(zip(shard_tasks[Path(path).name], job_results))
                progress.update(len(job_results))
        for split in splits:
            per_class: Counter[str] = Counter()
            written = boxes = 0
            for task in tasks[split]:
                result = results[task]
                if result.get("repairs"):
                    stats["repaired"].append({"file": task.rel, "split": split, "reasons": result["repairs"]})
                if "skip" in result:
                    blame = {key: result[key] for key in ("annotation", "field", "value") if key in result}
                    stats["skipped"].append({"file": task.rel, "split": split, "reason": result["skip"], **blame})
                    continue
                written += 1
                boxes += len(result["classes"])
                per_class.update(result["classes"])
            stats["splits"][split] = {
                "examples": written,
                "boxes": boxes,
                "shards": names_of[split],
                "per_class": {label_map[i]: per_class[label_map[i]] for i in sorted(label_map)},
            }
        for name in sorted(image_names):
            stem, suffix = os.path.splitext(name)
            if stem not in listed or suffix.lower() not in IMAGE_SUFFIXES:
                stats["ignored"].append({"file": f"images/{name}", "reason": ignored_reason(name)})
        write_label_map(tmp / "label_map.pbtxt", label_map)
        atomic_write_json(tmp / "stats.json", stats)
    seconds = time.perf_counter() - started
    _print_summary(stats, out)
    total = sum(s["examples"] for s in stats["splits"].values())
    print(f"tfrecord: {total} examples in {seconds:.2f} s ({total / seconds:.1f} images/s)")
    return stats


def _print_summary(stats: dict[str, Any], out: Path) -> None:
    for split, s in stats["splits"].items():
        print(f"tfrecord: {split}: {s['examples']} examples, {s['boxes']} boxes in {len(s['shards'])} shards")
    for kind, key in (("repaired", "reasons"), ("skipped", "reason"), ("ignored", "reason")):
        entries = stats[kind]
        print(f"tfrecord: {kind}: {len(entries)}")
        for entry in entries:
            reason = "; ".join(entry[key]) if isinstance(entry[key], list) else entry[key]
            print(f"  {entry['file']}: {reason}")
    print(f"tfrecord: wrote {out} (details in {out / 'stats.json'})")


def main(argv: Iterable[str] | None = None) -> int:
    parser = command_parser("stages.tfrecord", __doc__)
    parser.add_argument("--raw", type=Path, required=True, help="extracted dataset (download stage output)")
    parser.add_argument("--out", type=Path, required=True, help="records folder to write")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: all cores; at most one per shard)")
    return run_stage(parser, argv, lambda cfg, args: run(cfg, {"raw": args.raw}, {"records": args.out},
                                                         workers=args.workers),
                     errors=(DatasetError,))


if __name__ == "__main__":
    sys.exit(main())
