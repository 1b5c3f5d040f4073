"""The committed sample archives: reproducible from their script, pinned by the config, in the Pets layout."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from sample.make_sample import (
    APPLEDOUBLE,
    CLASSES,
    EXTRA_TRAINVAL,
    HEAD_FRACTION,
    LIST_HEADER,
    QUIRKS,
    SIDE_PX,
    TEST_N,
    TRAINVAL_N,
    main,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "sample"
ARCHIVES = ("images.tar.gz", "annotations.tar.gz")
REGENERATE = (
    "rerun `python sample/make_sample.py --out sample/` and copy the printed size and sha256 "
    "into conf/dataset/sample.yaml"
)
# Images whose bytes are not a readable RGB JPEG on purpose.
ODD_KINDS = ("gif", "png", "rgba", "grayscale", "cmyk", "truncated", "corrupt")
ODD_IMAGES = {name for kind in ODD_KINDS for name in QUIRKS[kind]}


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """Every file in both committed archives, by its path inside the archive."""
    merged: dict[str, bytes] = {}
    for name in ARCHIVES:
        merged.update(_members((SAMPLE / name).read_bytes()))
    return merged


def _rows(text: str) -> dict[str, tuple[int, int, int]]:
    rows = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            image, class_id, species, breed_id = line.split()
            rows[image] = (int(class_id), int(species), int(breed_id))
    return rows


@pytest.fixture(scope="module")
def lists(files) -> dict[str, dict[str, tuple[int, int, int]]]:
    return {split: _rows(files[f"annotations/{split}.txt"].decode()) for split in ("list", "trainval", "test")}


def test_regenerating_gives_the_committed_archives(tmp_path):
    main(["--out", str(tmp_path)])
    for name in ARCHIVES:
        committed, fresh = (SAMPLE / name).read_bytes(), (tmp_path / name).read_bytes()
        if committed != fresh:
            old, new = _members(committed), _members(fresh)
            changed = sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
            pytest.fail(
                f"sample/{name} differs from what its script makes now ({len(changed)} files, "
                f"e.g. {changed[:5]}): {REGENERATE}"
            )


def test_config_pins_the_committed_archives(cfg):
    assert [a.name for a in cfg.dataset.archives] == ["images", "annotations"]
    for archive in cfg.dataset.archives:
        path = REPO_ROOT / archive.urls[0]
        data = path.read_bytes()
        assert archive.size == len(data), f"{path}: size changed: {REGENERATE}"
        assert archive.sha256 == hashlib.sha256(data).hexdigest(), f"{path}: sha256 changed: {REGENERATE}"


def test_list_has_the_real_header_and_every_class(files, lists):
    assert files["annotations/list.txt"].decode().startswith(LIST_HEADER)
    cats = [b for b in CLASSES if b[0].isupper()]
    dogs = [b for b in CLASSES if b[0].islower()]
    assert (len(cats), len(dogs)) == (12, 25)
    seen = set()
    for image, (class_id, species, breed_id) in lists["list"].items():
        breed = image.rsplit("_", 1)[0]
        seen.add(breed)
        assert class_id == CLASSES.index(breed) + 1, image
        assert species == (1 if breed in cats else 2), image
        assert breed_id == (cats if species == 1 else dogs).index(breed) + 1, image
    assert seen == set(CLASSES)


def test_splits_partition_the_list(lists):
    trainval, test = lists["trainval"], lists["test"]
    assert not trainval.keys() & test.keys()
    assert {**trainval, **test} == lists["list"]
    expected_trainval = {f"{b}_{n}" for b in CLASSES for n in TRAINVAL_N} | set(EXTRA_TRAINVAL)
    assert set(trainval) == expected_trainval
    assert set(test) == {f"{b}_{n}" for b in CLASSES for n in TEST_N}


def test_xmls_exist_for_trainval_rows_only(files, lists):
    xmls = {p[len("annotations/xmls/") : -len(".xml")] for p in files if p.startswith("annotations/xmls/")}
    assert xmls == set(lists["trainval"]) - set(QUIRKS["no_xml"])


def test_every_listed_image_has_a_picture_and_a_trimap(files, lists):
    for image in lists["list"]:
        assert f"images/{image}.jpg" in files, image
        trimap = _decode(files[f"annotations/trimaps/{image}.png"])
        assert trimap.mode == "L", image
        assert set(np.unique(np.asarray(trimap))) <= {1, 2, 3}, image
        if image not in QUIRKS["truncated"] + QUIRKS["corrupt"]:
            assert _decode(files[f"images/{image}.jpg"]).size == trimap.size, image


def test_plain_images_are_rgb_jpegs_of_the_promised_size(files, lists):
    for image in set(lists["list"]) - ODD_IMAGES:
        picture = _decode(files[f"images/{image}.jpg"])
        assert (picture.format, picture.mode) == ("JPEG", "RGB"), image
        assert all(SIDE_PX[0] <= side <= SIDE_PX[1] for side in picture.size), image


def test_boxes_are_tight_around_the_head(files):
    for path in (p for p in files if p.startswith("annotations/xmls/")):
        image = path[len("annotations/xmls/") : -len(".xml")]
        root = ElementTree.fromstring(files[path])
        assert root.findtext("filename") == f"{image}.jpg"
        assert root.findtext("object/name") == ("cat" if image[0].isupper() else "dog")
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        xmin, ymin, xmax, ymax = (int(root.findtext(f"object/bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        if image in QUIRKS["box_outside"]:
            assert ymin < 0 and xmax > width, image
            xmin, ymin, xmax, ymax = max(xmin, 0), max(ymin, 0), min(xmax, width), min(ymax, height)
        assert 0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height, image
        longer = max(xmax - xmin, ymax - ymin) / min(width, height)
        assert HEAD_FRACTION[0] - 0.02 <= longer <= HEAD_FRACTION[1] + 0.02, image
        # The trimap's pet and border (the head grown by 2 px) span exactly the box grown by 2 px.
        trimap = np.asarray(_decode(files[f"annotations/trimaps/{image}.png"]))
        assert trimap.shape == (height, width), image
        ys, xs = np.nonzero(trimap != 2)
        grown = (max(xmin - 2, 0), max(ymin - 2, 0), min(xmax + 2, width), min(ymax + 2, height))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == grown, image


def test_quirks_have_the_promised_bytes(files, lists):
    def picture(image: str) -> bytes:
        return files[f"images/{image}.jpg"]

    for image in QUIRKS["gif"]:
        assert picture(image).startswith(b"GIF8") and _decode(picture(image)).format == "GIF"
    for image in QUIRKS["png"]:
        assert (_decode(picture(image)).format, _decode(picture(image)).mode) == ("PNG", "RGB")
    for image in QUIRKS["rgba"]:
        assert (_decode(picture(image)).format, _decode(picture(image)).mode) == ("PNG", "RGBA")
    for image in QUIRKS["grayscale"]:
        assert (_decode(picture(image)).format, _decode(picture(image)).mode) == ("JPEG", "L")
    for image in QUIRKS["cmyk"]:
        assert (_decode(picture(image)).format, _decode(picture(image)).mode) == ("JPEG", "CMYK")
    for image in QUIRKS["truncated"] + QUIRKS["corrupt"]:
        assert picture(image).startswith(b"\xff\xd8"), image
        with pytest.raises(OSError):  # PIL's UnidentifiedImageError is an OSError too
            _decode(picture(image))
    for image in QUIRKS["dirty"]:
        assert (_decode(picture(image)).format, _decode(picture(image)).mode) == ("JPEG", "RGB")
        with pytest.raises(ValueError, match="extraneous bytes before marker 0xd9"):  # libjpeg's warning, made fatal
            simplejpeg.decode_jpeg(picture(image), strict=True)
    for image in QUIRKS["no_xml"]:
        assert image in lists["trainval"] and f"annotations/xmls/{image}.xml" not in files
    for image in QUIRKS["box_outside"]:
        assert f"annotations/xmls/{image}.xml" in files  # the box itself: test_boxes_are_tight_around_the_head
    for name in QUIRKS["stray"]:
        assert name.rsplit(".", 1)[0] not in lists["list"]
        with pytest.raises(OSError):
            _decode(files[f"images/{name}"])
    for path in QUIRKS["appledouble"]:
        assert files[path] == APPLEDOUBLE and files[path].startswith(b"\x00\x05\x16\x07")
