"""DVC stage ``tfrecord``: raw images + annotations -> train/val TFRecord shards.

Splits trainval rows the way the TF OD API pets tool does (seeded shuffle, first
``train_fraction`` to train), judges every file by its bytes rather than its name, and
writes TF OD API examples (``detkit.records``), ``label_map.pbtxt`` and ``stats.json``
listing every repair and skip. Rows go to shards round-robin as in the pets tool, so every
shard is an independent job: a process pool decodes, serialises and writes whole shards, and
the shards are byte-identical for the same inputs and params whatever the process count. The
stage never imports TensorFlow (``detkit.records`` serialises and frames the records).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import simplejpeg
from lxml import etree
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from detkit.cli import run_stage, stage_parser
from detkit.fsio import atomic_dir, atomic_write_json
from detkit.labelmap import LabelMapError, pets_class_name, pets_label_map, read_label_map, write_label_map
from detkit.records import BOX_KEYS, TFRecordFile, encode_example, example_class

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
REENCODE_QUALITY = 95


class DatasetError(ValueError):
    """The dataset as a whole is unusable (missing list file, malformed row, ...)."""


@dataclass(frozen=True)
class Task:
    """One annotated image to turn into an example: picklable, for the worker pool."""

    image: str  # plain paths: Path objects cost the listing more than the stat calls they replace
    xml: str
    rel: str  # path relative to the raw folder, as reported in stats.json
    class_name: str | None  # Pets: the breed from the file name; VOC: None (per object)


# ---------------------------------------------------------------------------- listing


def _read_rows(path: Path) -> list[tuple[str, int]]:
    """``<image> <class_id> <species> <breed_id>`` rows; ``#`` lines are headers."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (the Pets layout needs annotations/trainval.txt and test.txt)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise DatasetError(f"{path}:{number}: expected '<image> <class_id> <species> <breed_id>', got {line!r}")
        rows.append((parts[0], int(parts[1])))
    return rows


def list_pets(raw: Path) -> tuple[list[tuple[str, str]], set[str], dict[int, str]]:
    """Trainval (image stem, breed) pairs in file order, every listed stem, the label map."""
    ann = raw / "annotations"
    trainval = _read_rows(ann / "trainval.txt")
    everything = trainval + _read_rows(ann / "test.txt")
    try:
        names = {pets_class_name(stem) for stem, _ in everything}
    except LabelMapError as exc:
        raise DatasetError(f"{ann}: {exc}") from exc
    label_map = pets_label_map(names)
    ids = {name: i for i, name in label_map.items()}
    for stem, class_id in everything:
        if ids[pets_class_name(stem)] != class_id:
            raise DatasetError(
                f"{ann}: row '{stem}' has class_id {class_id}, but breed '{pets_class_name(stem)}' is "
                f"id {ids[pets_class_name(stem)]} in case-insensitive alphabetical order"
            )
    listed = {stem for stem, _ in everything}
    return [(stem, pets_class_name(stem)) for stem, _ in trainval], listed, label_map


def list_voc(raw: Path, label_map_path: str) -> tuple[list[tuple[str, None]], set[str], dict[int, str]]:
    """Every ``annotations/xmls/*.xml`` (sorted), classes from each object's <name>."""
    try:
        label_map = read_label_map(raw / label_map_path)
    except LabelMapError as exc:
        raise DatasetError(str(exc)) from exc
    xmls = sorted((raw / "annotations" / "xmls").glob("*.xml"))
    if not xmls:
        raise DatasetError(f"{raw / 'annotations' / 'xmls'}: no Pascal VOC .xml files found")
    return [(p.stem, None) for p in xmls], {p.stem for p in xmls}, label_map


def split_rows(rows: list, train_fraction: float, seed: int) -> tuple[list, list]:
    """As the TF OD API's create_pet_tf_record: seeded shuffle, first share to train."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    num_train = int(train_fraction * len(shuffled))
    return shuffled[:num_train], shuffled[num_train:]


def file_names(folder: Path) -> set[str]:
    """Names of the regular files in ``folder``: one directory scan instead of a stat per row."""
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        return {entry.name for entry in entries if entry.is_file()}
    return set()


def find_image(image_names: set[str], stem: str) -> str | None:
    return next((stem + suffix for suffix in IMAGE_SUFFIXES if stem + suffix in image_names), None)


# ---------------------------------------------------------------------------- one image


def _decode(data: bytes) -> tuple[Image.Image, list[str]]:
    """Read every byte (so truncation shows now, not in training); return the image + repairs.

    Any repair means the original bytes are not a clean RGB JPEG and get re-encoded, so only then
    are the pixels decoded: a clean JPEG is stored as it is and checked by ``_libjpeg_warning``.
    """
    image = Image.open(io.BytesIO(data))
    repairs = []
    if image.format != "JPEG":
        repairs.append(f"{image.format} bytes behind a .jpg name: re-encoded as JPEG")
    else:
        warning = _libjpeg_warning(data)
        if warning:
            repairs.append(f"libjpeg warning: {warning}; re-encoded")
    if repairs or image.mode != "RGB":
        # Pillow tolerates libjpeg's warnings but not its errors: a truncated file raises here.
        image.load()
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # Transparent pixels carry arbitrary colour: flatten onto white, not black.
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
            repairs.append("alpha channel flattened onto white, converted to RGB")
        else:
            repairs.append(f"mode {image.mode} converted to RGB")
            image = image.convert("RGB")
    return image, repairs


def _libjpeg_warning(data: bytes) -> str | None:
    """What libjpeg-turbo complains about while decoding the JPEG ``data``, or None.

    Pillow silences libjpeg's warnings (junk before a marker, a missing end marker, ...), but
    TensorFlow prints them on every decode in training and eval, so such files get re-encoded.
    Decoding at 1/8 scale still reads every marker and entropy-coded byte, where warnings and
    errors arise, at half the cost of Pillow's full decode.
    """
    try:
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        return str(exc)
    return None


def _parse_objects(xml: str) -> tuple[tuple[int, int] | None, list[dict[str, Any]]]:
    root = etree.parse(xml).getroot()
    size = root.find("size")
    xml_size = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        xml_size = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise ValueError("an <object> has no <bndbox>")
        objects.append({
            "name": (obj.findtext("name") or "").strip(),
            "box": [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
            "difficult": int(obj.findtext("difficult") or 0),
            "truncated": int(obj.findtext("truncated") or 0),
            "view": (obj.findtext("pose") or "").strip(),
        })
    return xml_size, objects


def load_example(task: Task, class_ids: dict[str, int]) -> dict[str, Any]:
    """Read, check and repair one image + XML into a serialised example.

    Returns ``{"example": bytes, "classes": [...], "repairs": [...]}`` or ``{"skip": reason}``.
    Runs in worker processes: no TensorFlow here, only bytes, Pillow, simplejpeg, lxml and protobuf.
    """
    with open(task.image, "rb") as file:
        data = file.read()
    try:
        image, repairs = _decode(data)
    except UnidentifiedImageError:
        return {"skip": "undecodable image: no known image format in its bytes"}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return {"skip": f"undecodable image: {exc}"}
    reencode = bool(repairs)
    width, height = image.size
    try:
        xml_size, objects = _parse_objects(task.xml)
    except (etree.XMLSyntaxError, ValueError, TypeError) as exc:
        return {"skip": f"invalid annotation {os.path.basename(task.xml)}: {exc}"}
    if xml_size and xml_size != (width, height):
        repairs.append(f"XML size {xml_size[0]}x{xml_size[1]} differs from the image's {width}x{height}: "
                       "boxes normalised by the image")

    record: dict[str, Any] = {k: [] for k in (*BOX_KEYS, "text", "label", "difficult", "truncated", "view")}
    for obj in objects:
        class_name = task.class_name or obj["name"]
        if class_name not in class_ids:
            repairs.append(f"box of class '{class_name}' dropped: not in the label map")
            continue
        xmin, ymin, xmax, ymax = obj["box"]
        clipped = [min(max(v / s, 0.0), 1.0) for v, s in ((xmin, width), (ymin, height), (xmax, width), (ymax, height))]
        if clipped != [xmin / width, ymin / height, xmax / width, ymax / height]:
            repairs.append(f"box {obj['box']} reaches outside the {width}x{height} image: clipped")
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            repairs.append(f"box {obj['box']} is empty inside the image: dropped")
            continue
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), clipped):
            record[key].append(value)
        record["text"].append(class_name)
        record["label"].append(class_ids[class_name])
        record["difficult"].append(obj["difficult"])
        record["truncated"].append(obj["truncated"])
        record["view"].append(obj["view"])
    if not record["label"]:
        return {"skip": "no usable box in the annotation", "repairs": repairs}

    if reencode:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=REENCODE_QUALITY)
        data = buffer.getvalue()
    record.update(
        filename=os.path.basename(task.image),
        height=height,
        width=width,
        encoded=data,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return {"example": encode_example(record), "classes": record["text"], "repairs": repairs}


# ---------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ShardJob:
    """One shard file and its tasks in order: shards are independent, so one process writes
    each straight to disk and the parent never touches example bytes."""

    path: str
    tasks: list[Task]


def write_shard(job: ShardJob, class_ids: dict[str, int]) -> tuple[str, list[dict[str, Any]]]:
    """Write ``job.path``; return it with one ``load_example`` result per task, minus the bytes."""
    shard = TFRecordFile(Path(job.path))
    results = []
    try:
        for task in job.tasks:
            result = load_example(task, class_ids)
            if "example" in result:
                shard.write(result.pop("example"))
            results.append(result)
    finally:
        shard.close()
    return job.path, results


JobResult = tuple[str, list[dict[str, Any]]]
JobMap = Callable[[Callable[[ShardJob], JobResult], list[ShardJob]], Iterator[JobResult]]


@contextlib.contextmanager
def _shard_mapper(workers: int) -> Iterator[JobMap]:
    """A ``map`` over shard jobs that yields results as jobs finish: in-process (in order) for
    one worker, else a process pool for the whole run.

    Forked workers start at once; but forking a process that holds TensorFlow's threads can
    deadlock, so a parent that has already imported TensorFlow spawns fresh interpreters.
    """
    if workers <= 1:
        yield map
        return
    method = "spawn" if "tensorflow" in sys.modules else "fork"
    if method == "fork":  # what each worker would set up on its first image, done once for all
        Image.preinit()
        example_class()
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield pool.imap_unordered


def _shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    shard_names = {split: _shard_names(split, cfg.tfrecord[f"{split}_shards"]) for split in splits}
    tasks: dict[str, list[Task]] = {split: [] for split in splits}
    shard_tasks: dict[str, list[Task]] = {name: [] for names in shard_names.values() for name in names}
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
                            class_name)
                tasks[split].append(task)
                # Row position modulo shard count, skipped rows included, as the TF OD API pets tool.
                names = shard_names[split]
                shard_tasks[names[position % len(names)]].append(task)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        # Biggest first: the last job to start is a short one, so the processes finish together.
        jobs = sorted((ShardJob(str(tmp / name), shard_tasks[name]) for name in shard_tasks),
                      key=lambda job: -len(job.tasks))
        results: dict[Task, dict[str, Any]] = {}
        total = sum(len(job.tasks) for job in jobs)
        with (tqdm(total=total, desc="tfrecord", unit="img") as progress,
              _shard_mapper(min(workers or default_workers(), len(jobs))) as map_jobs):
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
                    stats["skipped"].append({"file": task.rel, "split": split, "reason": result["skip"]})
                    continue
                written += 1
                boxes += len(result["classes"])
                per_class.update(result["classes"])
            stats["splits"][split] = {
                "examples": written,
                "boxes": boxes,
                "shards": shard_names[split],
                "per_class": {label_map[i]: per_class[label_map[i]] for i in sorted(label_map)},
            }
        for name in sorted(image_names):
            stem, suffix = os.path.splitext(name)
            if stem not in listed or suffix.lower() not in IMAGE_SUFFIXES:
                stats["ignored"].append({"file": f"images/{name}", "reason": _ignored_reason(name)})
        write_label_map(tmp / "label_map.pbtxt", label_map)
        atomic_write_json(tmp / "stats.json", stats)
    seconds = time.perf_counter() - started
    _print_summary(stats, out)
    total = sum(s["examples"] for s in stats["splits"].values())
    print(f"tfrecord: {total} examples in {seconds:.2f} s ({total / seconds:.1f} images/s)")
    return stats


def _ignored_reason(name: str) -> str:
    suffix = os.path.splitext(name)[1]
    if name.startswith("._"):
        return "macOS AppleDouble metadata file, not an image"
    if suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({suffix or 'no extension'}), not listed in the annotations"
    return "not listed in the annotations"


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
    parser = stage_parser("stages.tfrecord", __doc__)
    parser.add_argument("--raw", type=Path, required=True, help="extracted dataset (download stage output)")
    parser.add_argument("--out", type=Path, required=True, help="records folder to write")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: all cores; at most one per shard)")
    return run_stage(parser, argv, lambda cfg, args: run(cfg, {"raw": args.raw}, {"records": args.out},
                                                         workers=args.workers),
                     errors=(DatasetError,))


if __name__ == "__main__":
    sys.exit(main())
