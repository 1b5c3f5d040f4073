"""`make batch`: the newest export over every image in a folder, in-process, in batches.

For each image ``INPUT/<rel>`` it writes ``OUTPUT/<rel>.json``: what the server's ``/invocations``
answers for that one image (TF Serving's row form, ``{"predictions": [{"detection_boxes": ...,
"detection_classes": ..., "detection_scores": ..., "num_detections": ...}]}``), and with ``--draw``
``OUTPUT/<rel>_detections.png`` (drawn as `make predict` draws). Then, over every image with a JSON:

- ``OUTPUT/detections.json``: COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in
  pixels, ``score``), every detection the export returned;
- ``OUTPUT/images.json``: a COCO dataset file (``images`` with ``file_name`` = ``<rel>``, ``width``,
  ``height``; ``categories`` from the label map; no annotations), so that
  ``COCO("images.json").loadRes("detections.json")`` works; image ids are 1-based in sorted order;
- ``OUTPUT/skipped.json``: every path under INPUT that was not processed, each with its reason: files that
  are not images or do not decode, and what is never opened (FIFOs, sockets, devices, folders that cannot
  be listed, links that loop, dangle, or lead to a folder, a special file or out of INPUT: not followed).

Images that already have their JSON (and PNG, with ``--draw``) are skipped, so a stopped run resumes.
Bad files never stop the run. A reader thread reads and checks the next batch while the current
one runs, and a writer thread writes the outputs.

INPUT and OUTPUT are local folders; ``s3://`` prefixes are SageMaker Batch Transform's
(``python -m detkit.cloud.transform``, which `make batch` runs for them).

    python -m detkit.serve.batch INPUT OUTPUT [--export models/export/pet_object_detection] [--batch-size 16]
        [--draw] [--min-score 0.3] [--top 5] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from detkit.config.cli import command_parser, export_folder, fail, load, run_command
from detkit.core import tflog
from detkit.core.fsio import EXPORT_LABEL_MAP, atomic_write_bytes, atomic_write_json, newest_version
from detkit.core.tree import open_regular, regular_files
from detkit.data.labelmap import LabelMapError, read_label_map
from detkit.eval import coco
from detkit.serve.predict import DEFAULT_MIN_SCORE, DEFAULT_TOP, draw_detections

# Images per signature call. On 2 CPU cores (benchmarks/batch_inference.py) the demo model runs
# 1.5-1.6x faster at 16 than one image per call and gains under 0.1x more at 32; a batch of 16 of the
# ResNet-50 model at 800 px holds about 3.7 GB, and a bad image re-runs its batch one image at a time.
DEFAULT_BATCH_SIZE = 16
PREFETCH_BATCHES = 2  # batches read ahead of the one running, and written behind it
DETECTIONS_FILE, IMAGES_FILE, SKIPPED_FILE = "detections.json", "images.json", "skipped.json"
# What the signature decodes (tf.io.decode_image), by the file's first bytes.
SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"BM", "BMP"))
SNIFF_BYTES = 12  # WebP: "RIFF", 4 bytes of size, "WEBP"
NOT_AN_IMAGE = "not an image (neither JPEG, PNG, GIF, BMP nor WebP)"

T = TypeVar("T")


class BatchError(RuntimeError):
    """INPUT, OUTPUT or the export cannot be used: nothing was run."""


@dataclasses.dataclass
class Picture:
    """One image file, read and its header checked."""

    rel: str  # path under INPUT, with '/'
    data: bytes
    width: int
    height: int


@dataclasses.dataclass
class Batch:
    pictures: list[Picture]
    bad: list[tuple[str, str]]  # (rel, reason): the files read since the previous batch that are no images


def image_format(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES if head.startswith(magic)), None)


def input_files(input_dir: Path, output_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Every regular file under ``input_dir`` (relative, '/'-separated, sorted), links to one inside it
    included, and each other path found there with why it is not read: special files, links that loop,
    dangle, lead to a folder, to a special file or out of INPUT (never followed), folders that cannot be
    listed. Nothing is opened. OUTPUT, when inside INPUT, is not searched: outputs are not inputs."""
    if not input_dir.is_dir():
        raise BatchError(f"{input_dir}: INPUT is not a folder" if input_dir.exists() else
                         f"{input_dir}: INPUT does not exist")
    if output_dir.resolve() == input_dir.resolve():
        raise BatchError(f"{output_dir}: OUTPUT must not be INPUT: the outputs would be taken for inputs")
    files, unread = regular_files(input_dir, "INPUT", output_dir, "OUTPUT: outputs are not inputs")
    if not files and not unread:
        raise BatchError(f"{input_dir}: INPUT holds no files")
    return sorted(files), unread


def answer_path(output_dir: Path, rel: str) -> Path:
    return output_dir / f"{rel}.json"


def drawn_path(output_dir: Path, rel: str) -> Path:
    return output_dir / f"{rel}_detections.png"


def read_picture(input_dir: Path, rel: str) -> Picture | str:
    """The file ``input_dir/rel``, or why it is not an image; the size comes from the header (the decoding
    is the model's)."""
    try:
        with open_regular(input_dir, rel) as f:
            head = f.read(SNIFF_BYTES)
            kind = image_format(head)
            if kind is None:
                return NOT_AN_IMAGE
            data = head + f.read()
    except OSError as exc:
        return f"cannot read it: {exc}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        return f"starts like a {kind} file but is none: its header does not parse"
    except Exception as exc:  # Pillow's parsers raise many kinds of errors on a malformed header
        return f"broken {kind} header: {exc}"
    return Picture(rel, data, width, height)


def read_batches(input_dir: Path, files: Iterable[str], batch_size: int) -> Iterator[Batch]:
    """Full batches of readable images, each with the bad files found while filling it."""
    pictures: list[Picture] = []
    bad: list[tuple[str, str]] = []
    for rel in files:
        read = read_picture(input_dir, rel)
        if isinstance(read, str):
            bad.append((rel, read))
        else:
            pictures.append(read)
        if len(pictures) == batch_size:
            yield Batch(pictures, bad)
            pictures, bad = [], []
    if pictures or bad:
        yield Batch(pictures, bad)


# pragma: no mutate start (reading ahead, the model and the writer: make test's slow tests run them)
def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced by a thread up to ``depth`` ahead of the consumer; its errors re-raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)
        else:
            put(end)

    thread = threading.Thread(target=produce, name="batch-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def detect(signature, pictures: list[Picture]) -> tuple[list[tuple[Picture, dict[str, np.ndarray]]],
                                                        list[tuple[str, str]]]:
    """Each picture's outputs, and the ones the model cannot decode: a failed batch is re-run one image
    at a time, so only its undecodable images are lost."""
    import tensorflow as tf

    from detkit.serve.tfserving import error_reason  # the reason TF Serving's 400 would give

    try:
        outputs = {k: v.numpy() for k, v in signature(inputs=tf.constant([p.data for p in pictures])).items()}
    except tf.errors.InvalidArgumentError as exc:
        if len(pictures) == 1:
            return [], [(pictures[0].rel, f"does not decode: {error_reason(exc)}")]
        done, bad = [], []
        for picture in pictures:
            one_done, one_bad = detect(signature, [picture])
            done += one_done
            bad += one_bad
        return done, bad
    return [(p, {k: v[i] for k, v in outputs.items()}) for i, p in enumerate(pictures)], []


def blank_png() -> bytes:
    """A warm-up input: TensorFlow optimises the graph at its first call (about half a second on 2
    cores), which belongs to loading the model, as with TF Serving's warm-up requests."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


def rest_answer(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """TF Serving's row-form answer for one instance (the signature's outputs for one image)."""
    return {"predictions": [{k: outputs[k].tolist() for k in sorted(outputs)}]}


class Writer:
    """Writes each image's outputs on one thread, behind the inference; owns what the run found."""

    def __init__(self, output_dir: Path, draw: Callable[[Picture, dict[str, Any]], None] | None, progress):
        self.output_dir, self.draw, self.progress = output_dir, draw, progress
        self.sizes: dict[str, tuple[int, int]] = {}  # rel -> (width, height) of the images done
        self.bad: dict[str, str] = {}
        self.retry: set[str] = set()  # bad only for this run (drawing failed): a re-run tries them again
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer")
        self._pending: deque[Future] = deque()

    def submit(self, done: list[tuple[Picture, dict[str, np.ndarray]]], bad: Iterable[tuple[str, str]]) -> None:
        while len(self._pending) >= PREFETCH_BATCHES:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, done, list(bad)))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _write(self, done: list[tuple[Picture, dict[str, np.ndarray]]], bad: list[tuple[str, str]]) -> None:
        self.bad.update(bad)
        self.progress.update(len(bad))
        for picture, outputs in done:
            answer = rest_answer(outputs)
            if self.draw:
                try:
                    self.draw(picture, answer["predictions"][0])
                except (OSError, SyntaxError, ValueError) as exc:
                    # The model decoded it and Pillow cannot. No JSON: a re-run tries it again.
                    self.bad[picture.rel] = f"cannot draw it: {exc}"
                    self.retry.add(picture.rel)
                    self.progress.update()
                    continue
            # Written last: the JSON is what marks the image done.
            atomic_write_bytes(answer_path(self.output_dir, picture.rel), (json.dumps(answer) + "\n").encode())
            self.sizes[picture.rel] = (picture.width, picture.height)
            self.progress.update()


# pragma: no mutate end
def stamp(path: Path) -> list[int] | None:
    """What tells a file changed since it was found bad: size and modification time."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def known_bad(input_dir: Path, output_dir: Path) -> dict[str, str]:
    """The bad files that ``skipped.json`` lists and that are unchanged since: not read again."""
    try:
        entries = json.loads((output_dir / SKIPPED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    # Entries without a stamp (paths not read, files to try again) are judged anew.
    return {e["file"]: e["reason"] for e in entries
            if e.get("stamp") is not None and stamp(input_dir / e["file"]) == e["stamp"]}


# pragma: no mutate start (the COCO files of the model's answers: make test's slow tests read them)
def listed_sizes(output_dir: Path) -> dict[str, tuple[int, int]]:
    """rel -> (width, height) of the images an earlier run's images.json lists: not opened again."""
    try:
        images = json.loads((output_dir / IMAGES_FILE).read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {image["file_name"]: (image["width"], image["height"]) for image in images}


def coco_files(input_dir: Path, output_dir: Path, files: list[str], sizes: dict[str, tuple[int, int]],
               label_map: dict[int, str]) -> tuple[dict, list[dict]]:
    """The COCO dataset (images, categories) and results of every image in ``files`` that has its JSON."""
    results, names = [], []
    for rel in files:
        path = answer_path(output_dir, rel)
        if not path.is_file():
            continue
        if rel in sizes:
            width, height = sizes[rel]
        else:  # done by an earlier run that images.json does not list
            with Image.open(input_dir / rel) as image:
                width, height = image.size
        prediction = json.loads(path.read_text())["predictions"][0]
        count = int(prediction["num_detections"])
        empty = np.zeros((0, 4))
        results.append(coco.ImageResult(
            image_id=len(results) + 1, width=width, height=height, gt_boxes=empty, gt_labels=np.zeros(0),
            boxes=np.asarray(prediction["detection_boxes"][:count]).reshape(-1, 4),
            classes=np.asarray(prediction["detection_classes"][:count]).astype(int),
            scores=np.asarray(prediction["detection_scores"][:count])))
        names.append(rel)
    dataset, detections = coco.to_coco(results, label_map)
    for image, rel in zip(dataset["images"], names):
        image["file_name"] = rel
    return dataset, detections


# pragma: no mutate end
def run(input_dir: Path, output_dir: Path, export: Path, batch_size: int = DEFAULT_BATCH_SIZE, draw: bool = False,
        top: int = DEFAULT_TOP, min_score: float = DEFAULT_MIN_SCORE, progress: bool = True) -> dict[str, Any]:
    """Run the newest version under ``export`` (``<base>/<model_name>``) over ``input_dir``; see the module doc.

    Returns the summary: files ``read`` (those not done before), images ``done`` now, ``already_done``,
    ``bad`` (rel -> reason: this run's, the unchanged ones of earlier runs and the paths not read),
    ``seconds`` (reading, inference, writing; loading and warming up the model is ``load_seconds``),
    ``images_per_s`` and the files written.
    """
    from tqdm import tqdm

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if batch_size < 1:
        raise BatchError(f"batch size {batch_size}: must be at least 1")
    files, unread = input_files(input_dir, output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise BatchError(f"{output_dir}: OUTPUT is a file, not a folder")
    version = newest_version(export)
    if version is None:
        raise BatchError(f"{export}: no exported version (run the export stage: make demo or make repro)")
    label_map = read_label_map(version / EXPORT_LABEL_MAP)
    reserved = {DETECTIONS_FILE, IMAGES_FILE, SKIPPED_FILE}
    listed = set(files)
    bad = {rel: reason for rel, reason in known_bad(input_dir, output_dir).items() if rel in listed}
    bad.update({rel: f"its output would overwrite OUTPUT/{rel}.json" for rel in files if f"{rel}.json" in reserved})
    todo = [rel for rel in files if rel not in bad and not (
        answer_path(output_dir, rel).is_file() and (not draw or drawn_path(output_dir, rel).is_file()))]

    def draw_one(picture: Picture, prediction: dict[str, Any]) -> None:
        draw_detections(picture.data, prediction, label_map, drawn_path(output_dir, picture.rel), top, min_score)

    already_done = len(files) - len(todo) - len(bad)
    sizes: dict[str, tuple[int, int]] = {}  # rel -> (width, height) of the images done now
    load_seconds = seconds = 0.0
    retry: set[str] = set()
    if todo:  # pragma: no mutate block (loads and runs the model)
        import tensorflow as tf

        started = time.perf_counter()
        loaded = tf.saved_model.load(str(version))
        if "serving_default" not in loaded.signatures:
            raise BatchError(f"{version}: the SavedModel has no serving_default signature")
        signature = loaded.signatures["serving_default"]
        signature(inputs=tf.constant([blank_png()]))
        load_seconds, started = time.perf_counter() - started, time.perf_counter()
        with tqdm(total=len(todo), desc="batch", unit="image", file=sys.stderr, disable=not progress) as bar:
            writer = Writer(output_dir, draw_one if draw else None, bar)
            try:
                for batch in prefetched(read_batches(input_dir, todo, batch_size), PREFETCH_BATCHES):
                    done, undecodable = detect(signature, batch.pictures) if batch.pictures else ([], [])
                    writer.submit(done, batch.bad + undecodable)
            finally:
                writer.close()
        seconds = time.perf_counter() - started
        sizes, bad, retry = writer.sizes, {**bad, **writer.bad}, writer.retry
    bad.update(unread)

    dataset, detections = coco_files(input_dir, output_dir, files, {**listed_sizes(output_dir), **sizes}, label_map)
    written = {name: output_dir / name for name in (IMAGES_FILE, DETECTIONS_FILE, SKIPPED_FILE)}
    atomic_write_json(written[IMAGES_FILE], dataset)
    # One line: up to export.max_detections an image, over many images, is too much to indent.
    atomic_write_bytes(written[DETECTIONS_FILE], (json.dumps(detections) + "\n").encode())
    atomic_write_json(written[SKIPPED_FILE], [
        {"file": rel, "reason": reason, "stamp": None if rel in retry or rel in unread else stamp(input_dir / rel)}
        for rel, reason in sorted(bad.items())])
    return {
        "export": str(version), "files": len(files), "read": len(todo), "done": len(sizes),
        "already_done": already_done, "bad": dict(sorted(bad.items())), "seconds": seconds,
        "load_seconds": load_seconds, "images_per_s": len(sizes) / seconds if sizes else 0.0,
        "images": len(dataset["images"]), "detections": len(detections),
        "written": {name: str(path) for name, path in written.items()},
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What ``main`` prints: the bad files, then one summary line."""
    written = summary["written"]
    lines = [f"bad: {rel}: {reason}" for rel, reason in summary["bad"].items()]
    if not summary["read"]:
        lines.append(f"nothing to do: all {summary['already_done']} images already have their outputs"
                     + (", and the bad files are unchanged" if summary["bad"] else ""))
    lines.append(f"batch: {summary['done']} images done, {summary['already_done']} skipped as already done, "
                 f"{len(summary['bad'])} bad (listed in {written[SKIPPED_FILE]}); {summary['seconds']:.1f} s, "
                 f"{summary['images_per_s']:.1f} images/s (model load {summary['load_seconds']:.1f} s); "
                 f"{written[IMAGES_FILE]} and {written[DETECTIONS_FILE]}: {summary['images']} images, "
                 f"{summary['detections']} detections")
    return lines


# pragma: no mutate block (the command line)
def main(argv: list[str] | None = None) -> int:
    parser = command_parser("detkit.serve.batch", __doc__)
    parser.add_argument("input", help="folder of images (searched recursively)")
    parser.add_argument("output", help="folder for the outputs (made if missing)")
    parser.add_argument("--export", type=Path,
                        help="export folder <base>/<model_name>; its newest version runs "
                             "(default: models/export/<export.model_name>)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per model call (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--draw", action="store_true", help="also write <rel>_detections.png, as make predict draws")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="detections drawn (with --draw)")
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE,
                        help="lowest score drawn (with --draw); the JSON files hold every detection")

    def batch(args: argparse.Namespace) -> int:
        on_s3 = [uri.startswith("s3://") for uri in (args.input, args.output)]
        if all(on_s3):
            return fail(f"INPUT {args.input} and OUTPUT {args.output}: s3:// prefixes are SageMaker Batch "
                        "Transform's: python -m detkit.cloud.transform INPUT OUTPUT (make batch runs it for them)")
        if any(on_s3):
            return fail(f"INPUT {args.input} and OUTPUT {args.output}: both must be s3:// (SageMaker Batch "
                        "Transform) or both local folders")
        if args.overrides or not args.export:  # the config only where it has a say
            args.export = args.export or export_folder(load(args))
        if tflog.VARIABLE not in os.environ:
            # Undecodable images are expected here and reported per file; TensorFlow's C++ log lines
            # for each failed decode would only repeat that.
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        summary = run(Path(args.input), Path(args.output), args.export, args.batch_size, args.draw, args.top,
                      args.min_score)
        print("\n".join(summary_lines(summary)))
        return 0

    return run_command(parser, argv, batch, errors=(BatchError, LabelMapError))


if __name__ == "__main__":
    sys.exit(main())
