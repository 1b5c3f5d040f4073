"""DVC stage ``tfrecord``: raw images + annotations -> train/val TFRecord shards.

Splits trainval rows the way the TF OD API pets tool does (seeded shuffle, first
``train_fraction`` to train), judges every file by its bytes rather than its name, and
writes TF OD API examples (``detkit.records``), ``label_map.pbtxt`` and ``stats.json``
listing every repair and skip. Decoding and serialising run in a process pool; results come
back in input order, so the shards are byte-identical for the same inputs and params. The
stage never imports TensorFlow (``detkit.records`` serialises and frames the records).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Decode fully (so truncation shows now, not in training); return RGB + repairs.

    Any repair means the original bytes are not a plain RGB JPEG and get re-encoded.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    repairs = []
    if image.format != "JPEG":
        repairs.append(f"{image.format} bytes behind a .jpg name: re-encoded as JPEG")
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
    Runs in worker processes: no TensorFlow here, only bytes, Pillow, lxml and protobuf.
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


SPILL_ROTATE_BYTES = 256 << 20


_spill_files: dict[str, io.BufferedWriter] = {}  # in each worker: spill folder -> the file it appends to


def _load_spilled(task: Task, class_ids: dict[str, int], spill_dir: str, rotate_bytes: int) -> dict[str, Any]:
    """Worker side of the pool: the example goes to this process's spill file and only its
    place comes back, instead of ~35 KB per image pickled through the pool's one pipe.

    Each worker fills its files in task order and starts a new one past ``rotate_bytes``,
    so the parent, reading in task order, may delete a file once it reads the next one.
    """
    result = load_example(task, class_ids)
    if "example" in result:
        spill = _spill_files.get(spill_dir)
        if spill is None or spill.tell() > rotate_bytes:
            number = int(Path(spill.name).stem.split("-")[1]) + 1 if spill else 0
            if spill:
                spill.close()
            spill = _spill_files[spill_dir] = open(Path(spill_dir) / f"{os.getpid()}-{number}.bin", "wb")  # noqa: SIM115
        offset = spill.tell()
        spill.write(result["example"])
        spill.flush()  # in the kernel's hands before the parent hears of it
        result["example"] = (os.getpid(), spill.name, offset, len(result["example"]))
    return result


def _unspill(results: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Parent side: read each example back from its worker's spill file, in task order."""
    current: dict[int, tuple[str, int]] = {}  # worker pid -> (open spill file, descriptor)
    try:
        for result in results:
            if "example" in result:
                pid, path, offset, size = result["example"]
                if pid not in current or current[pid][0] != path:
                    if pid in current:  # that worker moved on: nothing later lives in its old file
                        os.close(current[pid][1])
                        os.unlink(current[pid][0])
                    current[pid] = (path, os.open(path, os.O_RDONLY))
                result["example"] = os.pread(current[pid][1], size, offset)
            yield result
    finally:
        for _, fd in current.values():
            os.close(fd)


LoadAll = Callable[[list[Task], dict[str, int]], Iterator[dict[str, Any]]]


@contextlib.contextmanager
def _mapper(workers: int, spill_parent: Path, spill_rotate_bytes: int = SPILL_ROTATE_BYTES) -> Iterator[LoadAll]:
    """``load_example`` over tasks, results in input order: in-process for one worker, else one
    pool for the whole run (starting processes costs as much as decoding hundreds of images).

    Forked workers start at once; but forking a process that holds TensorFlow's threads can
    deadlock, so a parent that has already imported TensorFlow spawns fresh interpreters.
    """
    if workers <= 1:
        yield lambda tasks, class_ids: (load_example(task, class_ids) for task in tasks)
        return
    method = "spawn" if "tensorflow" in sys.modules else "fork"
    if method == "fork":  # what each worker would set up on its first image, done once for all
        Image.preinit()
        example_class()
    # Spill files sit beside the output: /tmp may be RAM, and the records need that disk anyway.
    with (tempfile.TemporaryDirectory(prefix=".tfrecord-spill-", dir=spill_parent) as spill_dir,
          multiprocessing.get_context(method).Pool(workers) as pool):
        def load_all(tasks: list[Task], class_ids: dict[str, int]) -> Iterator[dict[str, Any]]:
            load = functools.partial(_load_spilled, class_ids=class_ids, spill_dir=spill_dir,
                                     rotate_bytes=spill_rotate_bytes)
            # Big chunks save round trips; a few per worker at the end keep the last ones even.
            chunksize = max(1, min(64, len(tasks) // (8 * workers)))
            return _unspill(pool.imap(load, tasks, chunksize=chunksize))
        yield load_all


def _shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(cfg, inputs: dict[str, Path], outputs: dict[str, Path], workers: int | None = None) -> dict[str, Any]:
    """Build ``outputs["records"]`` (shards, label_map.pbtxt, stats.json) from ``inputs["raw"]``."""
    raw, out = Path(inputs["raw"]), Path(outputs["records"])
    workers = workers or default_workers()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _mapper(workers, out.parent) as load_all:
        return _write_records(cfg, raw, out, load_all)


def _write_records(cfg, raw: Path, out: Path, load_all) -> dict[str, Any]:
    started = time.perf_counter()
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
    tasks: dict[str, list[Task]] = {split: [] for split in splits}
    unusable: dict[str, list[dict[str, str]]] = {split: [] for split in splits}
    image_names, xml_names = file_names(images), file_names(xmls)
    for split, split_rows_ in splits.items():
        for stem, class_name in split_rows_:
            image = find_image(image_names, stem)
            if image is None:
                unusable[split].append({"file": f"images/{stem}.jpg", "split": split, "reason": "image file missing"})
            elif f"{stem}.xml" not in xml_names:
                unusable[split].append({"file": f"images/{image}", "split": split,
                                        "reason": "no XML annotation (no head box)"})
            else:
                tasks[split].append(Task(os.path.join(images, image), os.path.join(xmls, f"{stem}.xml"),
                                         f"images/{image}", class_name))
    # One stream for both splits: the pool does not drain and refill between them.
    results = load_all([task for split in splits for task in tasks[split]], ids)
    with atomic_dir(out) as tmp:
        for split in splits:
            stats["skipped"].extend(unusable[split])
            count = cfg.tfrecord[f"{split}_shards"]
            names = _shard_names(split, count)
            writers = [TFRecordFile(tmp / n) for n in names]
            per_class: Counter[str] = Counter()
            written = boxes = 0
            progress = tqdm(itertools.islice(results, len(tasks[split])), total=len(tasks[split]),
                            desc=f"tfrecord {split}", unit="img")
            for task, result in zip(tasks[split], progress):
                if result.get("repairs"):
                    stats["repaired"].append({"file": task.rel, "split": split, "reasons": result["repairs"]})
                if "skip" in result:
                    stats["skipped"].append({"file": task.rel, "split": split, "reason": result["skip"]})
                    continue
                writers[written % count].write(result["example"])
                written += 1
                boxes += len(result["classes"])
                per_class.update(result["classes"])
            for writer in writers:
                writer.close()
            stats["splits"][split] = {
                "examples": written,
                "boxes": boxes,
                "shards": names,
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
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    return run_stage(parser, argv, lambda cfg, args: run(cfg, {"raw": args.raw}, {"records": args.out},
                                                         workers=args.workers),
                     errors=(DatasetError,))


if __name__ == "__main__":
    sys.exit(main())
