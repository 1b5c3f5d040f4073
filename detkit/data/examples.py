"""One annotated image -> one TF OD API example, checked and repaired; shards written by worker processes.

Every file is judged by its bytes rather than its name: a clean RGB JPEG is stored as it is, anything
else (another format behind ``.jpg``, grayscale, CMYK, alpha, JPEGs libjpeg warns about) is decoded
and re-encoded, and each repair is reported. Rows go to shards round-robin as in the TF OD API pets
tool, so every shard is an independent job: a process pool decodes, serialises and writes whole
shards, byte-identical for the same inputs whatever the process count. No TensorFlow here
(``detkit.data.records`` serialises and frames the records).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import simplejpeg
from lxml import etree
from PIL import Image, UnidentifiedImageError

from detkit.data.annotations import AnnotationError, parse_objects
from detkit.data.records import BOX_KEYS, TFRecordFile, encode_example, example_class

REENCODE_QUALITY = 95


@dataclass(frozen=True)
class Task:
    """One annotated image to turn into an example: picklable, for the worker pool."""

    image: str  # plain paths: Path objects cost the listing more than the stat calls they replace
    xml: str
    rel: str  # the image's path relative to the raw folder, as reported in stats.json
    xml_rel: str  # the annotation's
    class_name: str | None  # Pets: the breed from the file name; VOC: None (per object)


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


def load_example(task: Task, class_ids: dict[str, int]) -> dict[str, Any]:
    """Read, check and repair one image + XML into a serialised example.

    Returns ``{"example": bytes, "classes": [...], "repairs": [...]}`` or ``{"skip": reason}``, the
    latter with ``annotation`` (and the ``field`` and ``value`` at fault) when the XML is to blame.
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
        xml_size, objects = parse_objects(task.xml)
    except AnnotationError as exc:
        return {"skip": f"invalid annotation {task.xml_rel}: {exc}", "annotation": task.xml_rel,
                "field": exc.field, "value": exc.value}
    except etree.XMLSyntaxError as exc:
        return {"skip": f"invalid annotation {task.xml_rel}: {exc}", "annotation": task.xml_rel}
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


@dataclass(frozen=True)
class ShardJob:
    """One shard file and its tasks in order: shards are independent, so one process writes
    each straight to disk and the parent never touches example bytes."""

    path: str
    tasks: list[Task]


class ExampleError(RuntimeError):
    """Reading one image and its annotation failed in a way no check foresaw; names both files."""


def write_shard(job: ShardJob, class_ids: dict[str, int]) -> tuple[str, list[dict[str, Any]]]:
    """Write ``job.path``; return it with one ``load_example`` result per task, minus the bytes."""
    shard = TFRecordFile(Path(job.path))
    results = []
    try:
        for task in job.tasks:
            try:
                result = load_example(task, class_ids)
                if "example" in result:
                    shard.write(result.pop("example"))
            except Exception as exc:
                # Out of a worker process the traceback alone does not say which of its files it was on.
                raise ExampleError(f"{task.rel} (annotation {task.xml_rel}, shard {os.path.basename(job.path)}): "
                                   f"{type(exc).__name__}: {exc}") from exc
            results.append(result)
    finally:
        shard.close()
    return job.path, results


JobResult = tuple[str, list[dict[str, Any]]]
JobMap = Callable[[Callable[[ShardJob], JobResult], list[ShardJob]], Iterator[JobResult]]


@contextlib.contextmanager
def shard_mapper(workers: int) -> Iterator[JobMap]:
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


def shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
