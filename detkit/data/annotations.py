"""Reading a dataset's annotations: the Pets list files and the Pascal VOC XMLs, the split.

Pets layout (docs/dataset.md): ``annotations/trainval.txt`` and ``test.txt`` rows
``<image> <class_id> <species> <breed_id>``, the breed from the file name, head boxes in
``annotations/xmls/<image>.xml``. VOC layout: every ``annotations/xmls/*.xml``, the class from
each object's ``<name>``, ids from the dataset's label map.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree

from detkit.data.labelmap import LabelMapError, pets_class_name, pets_label_map, read_label_map

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


class DatasetError(ValueError):
    """The dataset as a whole is unusable (missing list file, malformed row, ...)."""


# pragma: no mutate start (listing the dataset: test_tfrecord runs it through the stage)
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


# pragma: no mutate end
def split_rows(rows: list, train_fraction: float, seed: int) -> tuple[list, list]:
    """As the TF OD API's create_pet_tf_record: seeded shuffle, first share to train."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    num_train = int(train_fraction * len(shuffled))
    return shuffled[:num_train], shuffled[num_train:]


# pragma: no mutate start (listing the dataset: test_tfrecord runs it through the stage)
def file_names(folder: Path) -> set[str]:
    """Names of the regular files in ``folder``: one directory scan instead of a stat per row."""
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        return {entry.name for entry in entries if entry.is_file()}
    return set()


def find_image(image_names: set[str], stem: str) -> str | None:
    return next((stem + suffix for suffix in IMAGE_SUFFIXES if stem + suffix in image_names), None)


# pragma: no mutate end
class AnnotationError(ValueError):
    """One value of an annotation XML is missing, not a number, not finite or out of range."""

    def __init__(self, field: str, value: str | None, problem: str):
        super().__init__(field, value, problem)
        self.field, self.value, self.problem = field, value, problem

    def __str__(self) -> str:
        return f"{self.field} {'(absent)' if self.value is None else repr(self.value)}: {self.problem}"


# What a value must be besides a finite number: a test and what the error says when it fails.
Rule = tuple[Callable[[float], bool], str]
SIDE: Rule = (lambda v: v >= 1 and v.is_integer(), "not a whole number of pixels, at least 1")
FLAG: Rule = (lambda v: v in (0, 1), "neither 0 nor 1")


def _number(element: etree._Element, path: str, field: str, rule: Rule | None = None,
            default: float | None = None) -> float:
    """The number at ``path`` under ``element``; ``field`` names it in errors. Pixel coordinates may
    be any finite number (boxes are clipped to the image later), so NaN and infinities, which
    ``float()`` accepts ('nan', 'inf', '1e999'), are refused here for every field."""
    text = element.findtext(path)
    if text is None or not text.strip():
        if default is not None:
            return default
        raise AnnotationError(field, text, "missing")
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(field, text, "not a number") from None
    if not math.isfinite(value):
        raise AnnotationError(field, text, "not a finite number")
    if rule is not None and not rule[0](value):
        raise AnnotationError(field, text, rule[1])
    return value


def parse_objects(xml: str) -> tuple[tuple[int, int] | None, list[dict[str, Any]]]:
    """The ``<size>`` (width, height), if given, and every ``<object>``; any value read that is not a
    usable number raises ``AnnotationError`` naming its field (``object[2]/bndbox/xmin``). The bytes are
    parsed, not the file: text that is not in its encoding is then an ``XMLSyntaxError`` like any other
    malformed XML (lxml reading the file itself raises a bare OSError for it)."""
    root = etree.fromstring(Path(xml).read_bytes(), base_url=xml)
    size = root.find("size")
    xml_size = None
    if size is not None:
        xml_size = (int(_number(size, "width", "size/width", SIDE)), int(_number(size, "height", "size/height", SIDE)))
    objects = []
    for number, obj in enumerate(root.iter("object"), start=1):
        where = f"object[{number}]"
        box = obj.find("bndbox")
        if box is None:
            raise AnnotationError(f"{where}/bndbox", None, "missing")
        objects.append({
            "name": (obj.findtext("name") or "").strip(),
            "box": [_number(box, k, f"{where}/bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")],
            "difficult": int(_number(obj, "difficult", f"{where}/difficult", FLAG, default=0)),
            "truncated": int(_number(obj, "truncated", f"{where}/truncated", FLAG, default=0)),
            "view": (obj.findtext("pose") or "").strip(),
        })
    return xml_size, objects


# pragma: no mutate block (listing the dataset: test_tfrecord runs it through the stage)
def ignored_reason(name: str) -> str:
    suffix = os.path.splitext(name)[1]
    if name.startswith("._"):
        return "macOS AppleDouble metadata file, not an image"
    if suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({suffix or 'no extension'}), not listed in the annotations"
    return "not listed in the annotations"
