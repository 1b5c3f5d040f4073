"""detkit.data.examples: one image and its annotation into one example, checked and repaired, each repair
reported; what a worker process reports about the file it was on."""

from __future__ import annotations

import functools
import hashlib
import io
import re

import pytest
from PIL import Image

from detkit.data.examples import ExampleError, ShardJob, Task, load_example, shard_mapper, write_shard
from detkit.data.records import example_class

XML = ("<annotation><size><width>64</width><height>48</height></size><object><name>cat</name>"
       "<bndbox><xmin>4</xmin><ymin>4</ymin><xmax>{xmax}</xmax><ymax>40</ymax></bndbox></object></annotation>")


def task(raw, stem: str, xmax: str = "60", image: bool = True) -> Task:
    (raw / "images").mkdir(parents=True, exist_ok=True)
    (raw / "annotations" / "xmls").mkdir(parents=True, exist_ok=True)
    if image:
        Image.new("RGB", (64, 48), (200, 120, 40)).save(raw / "images" / f"{stem}.jpg")
    (raw / "annotations" / "xmls" / f"{stem}.xml").write_text(XML.format(xmax=xmax))
    return Task(str(raw / "images" / f"{stem}.jpg"), str(raw / "annotations" / "xmls" / f"{stem}.xml"),
                f"images/{stem}.jpg", f"annotations/xmls/{stem}.xml", None)


def test_a_bad_value_skips_the_image_naming_the_annotation_field_and_value(tmp_path):
    good, bad = task(tmp_path, "cat_1"), task(tmp_path, "cat_2", xmax="nan")
    _, results = write_shard(ShardJob(str(tmp_path / "shard"), [good, bad]), {"cat": 1})
    assert "skip" not in results[0]
    assert results[1] == {
        "skip": "invalid annotation annotations/xmls/cat_2.xml: object[1]/bndbox/xmax 'nan': not a finite number",
        "annotation": "annotations/xmls/cat_2.xml", "field": "object[1]/bndbox/xmax", "value": "nan"}


def test_an_annotation_not_in_its_encoding_skips_the_image_naming_the_annotation(tmp_path):
    # One byte of UTF-8 flipped (as the fuzz test found): lxml reading the file raised a bare OSError,
    # which ended the stage.
    good, bad = task(tmp_path, "cat_1"), task(tmp_path, "cat_2")
    path = tmp_path / "annotations" / "xmls" / "cat_2.xml"
    path.write_bytes(path.read_bytes().replace(b"<name>cat", b"<name>\xe9cat"))
    _, results = write_shard(ShardJob(str(tmp_path / "shard"), [good, bad]), {"cat": 1})
    assert "skip" not in results[0]
    assert results[1]["annotation"] == "annotations/xmls/cat_2.xml"
    assert results[1]["skip"].startswith("invalid annotation annotations/xmls/cat_2.xml: Invalid bytes in character "
                                         "encoding")


def test_an_error_in_a_worker_process_names_the_file_it_was_on(tmp_path):
    # An image that vanished after the listing: nothing checks for it, so open() raises in the worker.
    jobs = [ShardJob(str(tmp_path / "train-0"), [task(tmp_path, "cat_1")]),
            ShardJob(str(tmp_path / "train-1"), [task(tmp_path, "cat_2", image=False)])]
    with pytest.raises(ExampleError) as err, shard_mapper(2) as map_jobs:
        list(map_jobs(functools.partial(write_shard, class_ids={"cat": 1}), jobs))
    assert str(err.value).startswith(
        "images/cat_2.jpg (annotation annotations/xmls/cat_2.xml, shard train-1): FileNotFoundError: ")
    assert "FileNotFoundError" in str(err.value.__cause__)  # the worker's own traceback travels with it


def jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


ORANGE = Image.new("RGB", (64, 48), (200, 120, 40))
BOX = "<bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>"


def annotation(*objects: str, size: str = "<size><width>64</width><height>48</height></size>") -> str:
    return f"<annotation>{size}{''.join(objects)}</annotation>"


def obj(name: str, box: tuple, extra: str = "") -> str:
    return f"<object><name>{name}</name>{extra}{BOX.format(*box)}</object>"


def load(tmp_path, data: bytes, xml: str, class_name: str | None = None, classes=None) -> dict:
    """``load_example`` on ``data`` stored as ``images/cat_1.jpg`` with ``xml`` as its annotation; the
    example parsed back into its features (key -> list of values)."""
    (tmp_path / "cat_1.jpg").write_bytes(data)
    (tmp_path / "cat_1.xml").write_text(xml)
    task = Task(str(tmp_path / "cat_1.jpg"), str(tmp_path / "cat_1.xml"), "images/cat_1.jpg",
                "annotations/xmls/cat_1.xml", class_name)
    result = load_example(task, classes or {"cat": 1, "dog": 2})
    if "example" in result:
        parsed = example_class().FromString(result.pop("example")).features.feature
        result["features"] = {key: list(getattr(value, value.WhichOneof("kind")).value)
                              for key, value in parsed.items()}
    return result


def pixels(encoded: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(encoded))
    assert image.format == "JPEG"
    return image


def test_a_clean_jpeg_is_stored_as_it_is_with_its_boxes_normalised(tmp_path):
    data = jpeg(ORANGE)
    result = load(tmp_path, data, annotation(
        obj("cat", (8, 12, 40, 36), "<pose>Left</pose><truncated>1</truncated>"),
        obj("dog", (0, 0, 64, 48), "<difficult>1</difficult>")))
    assert result["classes"] == ["cat", "dog"] and result["repairs"] == []
    features = result["features"]
    assert features.pop("image/encoded") == [data]
    assert features == {
        "image/height": [48], "image/width": [64], "image/filename": [b"cat_1.jpg"], "image/source_id": [b"cat_1.jpg"],
        "image/key/sha256": [hashlib.sha256(data).hexdigest().encode()], "image/format": [b"jpeg"],
        "image/object/bbox/xmin": pytest.approx([0.125, 0.0]), "image/object/bbox/xmax": pytest.approx([0.625, 1.0]),
        "image/object/bbox/ymin": pytest.approx([0.25, 0.0]), "image/object/bbox/ymax": pytest.approx([0.75, 1.0]),
        "image/object/class/text": [b"cat", b"dog"], "image/object/class/label": [1, 2],
        "image/object/difficult": [0, 1], "image/object/truncated": [1, 0], "image/object/view": [b"Left", b""]}


def test_the_pets_class_comes_from_the_file_name_not_the_object(tmp_path):
    result = load(tmp_path, jpeg(ORANGE), annotation(obj("dog", (8, 12, 40, 36))), class_name="cat")
    assert result["classes"] == ["cat"] and result["features"]["image/object/class/label"] == [1]


@pytest.mark.parametrize("image, make, repairs", [
    (ORANGE, png, ["PNG bytes behind a .jpg name: re-encoded as JPEG"]),
    (ORANGE.convert("L"), jpeg, ["mode L converted to RGB"]),
    (ORANGE.convert("CMYK"), jpeg, ["mode CMYK converted to RGB"]),
    (ORANGE.convert("RGBA"), png, ["PNG bytes behind a .jpg name: re-encoded as JPEG",
                                   "alpha channel flattened onto white, converted to RGB"]),
], ids=["png", "grayscale", "cmyk", "rgba"])
def test_what_is_not_a_clean_rgb_jpeg_is_reencoded_and_reported(tmp_path, image, make, repairs):
    result = load(tmp_path, make(image), annotation(obj("cat", (8, 12, 40, 36))))
    assert result["repairs"] == repairs
    stored = result["features"]["image/encoded"][0]
    assert result["features"]["image/key/sha256"] == [hashlib.sha256(stored).hexdigest().encode()]
    decoded = pixels(stored)
    assert (decoded.mode, decoded.size) == ("RGB", (64, 48))
    wanted = image.convert("RGB").getpixel((32, 24))
    assert max(abs(a - b) for a, b in zip(decoded.getpixel((32, 24)), wanted)) <= 8, wanted


def test_transparent_pixels_are_flattened_onto_white(tmp_path):
    image = Image.new("RGBA", (64, 48), (200, 120, 40, 255))
    image.paste((0, 0, 0, 0), (0, 0, 32, 48))  # left half: black, fully transparent
    result = load(tmp_path, png(image), annotation(obj("cat", (8, 12, 40, 36))))
    decoded = pixels(result["features"]["image/encoded"][0])
    assert min(decoded.getpixel((8, 24))) >= 247  # white, not the hidden black
    assert max(abs(a - b) for a, b in zip(decoded.getpixel((56, 24)), (200, 120, 40))) <= 8


def test_a_palette_image_with_a_transparent_colour_is_flattened_onto_white(tmp_path):
    image = Image.new("P", (64, 48), 1)
    image.putpalette([0, 0, 0, 200, 120, 40] + [0] * 762)
    image.paste(0, (0, 0, 32, 48))
    out = io.BytesIO()
    image.save(out, "GIF", transparency=0)
    result = load(tmp_path, out.getvalue(), annotation(obj("cat", (8, 12, 40, 36))))
    assert result["repairs"] == ["GIF bytes behind a .jpg name: re-encoded as JPEG",
                                 "alpha channel flattened onto white, converted to RGB"]
    assert min(pixels(result["features"]["image/encoded"][0]).getpixel((8, 24))) >= 247


def test_a_jpeg_that_libjpeg_warns_about_is_reencoded(tmp_path):
    data = jpeg(ORANGE)
    dirty = data[:-2] + bytes(range(1, 41)) + data[-2:]  # junk before the end marker, as in the real archive
    result = load(tmp_path, dirty, annotation(obj("cat", (8, 12, 40, 36))))
    [repair] = result["repairs"]  # how many of them libjpeg counts as extraneous is libjpeg's business
    assert re.fullmatch(r"libjpeg warning: Corrupt JPEG data: \d+ extraneous bytes before marker 0xd9; re-encoded",
                        repair), repair
    stored = result["features"]["image/encoded"][0]
    assert stored != dirty and pixels(stored).size == (64, 48)


def test_boxes_are_clipped_to_the_image_and_empty_or_unknown_ones_dropped(tmp_path):
    result = load(tmp_path, jpeg(ORANGE), annotation(
        obj("cat", (-8, -4, 72, 60)), obj("cat", (70, 10, 90, 20)), obj("cat", (10, 20, 10, 30)),
        obj("bird", (8, 12, 40, 36)), obj("dog", (16, 12, 48, 24))))
    assert result["repairs"] == [
        "box [-8.0, -4.0, 72.0, 60.0] reaches outside the 64x48 image: clipped",
        "box [70.0, 10.0, 90.0, 20.0] reaches outside the 64x48 image: clipped",
        "box [70.0, 10.0, 90.0, 20.0] is empty inside the image: dropped",
        "box [10.0, 20.0, 10.0, 30.0] is empty inside the image: dropped",
        "box of class 'bird' dropped: not in the label map"]
    features = result["features"]
    assert result["classes"] == ["cat", "dog"]
    assert [features[f"image/object/bbox/{k}"] for k in ("xmin", "ymin", "xmax", "ymax")] == [
        [0.0, 0.25], [0.0, 0.25], [1.0, 0.75], [1.0, 0.5]]
    assert result["features"]["image/encoded"][0] == jpeg(ORANGE)  # boxes are repaired, the image is not touched


def test_boxes_are_normalised_by_the_image_when_the_xml_says_another_size(tmp_path):
    result = load(tmp_path, jpeg(ORANGE), annotation(
        obj("cat", (8, 12, 40, 36)), size="<size><width>640</width><height>480</height></size>"))
    assert result["repairs"] == ["XML size 640x480 differs from the image's 64x48: boxes normalised by the image"]
    assert result["features"]["image/object/bbox/xmax"] == [0.625]


def test_an_image_without_a_usable_box_is_skipped_with_its_repairs(tmp_path):
    assert load(tmp_path, jpeg(ORANGE), annotation(obj("bird", (8, 12, 40, 36)))) == {
        "skip": "no usable box in the annotation", "repairs": ["box of class 'bird' dropped: not in the label map"]}
    assert load(tmp_path, jpeg(ORANGE), annotation())["skip"] == "no usable box in the annotation"


def test_an_undecodable_image_or_unreadable_annotation_is_skipped_by_name(tmp_path):
    xml = annotation(obj("cat", (8, 12, 40, 36)))
    assert load(tmp_path, b"\x00" * 64, xml) == {"skip": "undecodable image: no known image format in its bytes"}
    data = jpeg(ORANGE)
    truncated = load(tmp_path, data[:len(data) // 2], xml)["skip"]
    assert truncated.startswith("undecodable image: ") and "runcated" in truncated, truncated
    broken = load(tmp_path, data, "<annotation><object>")
    assert broken["skip"].startswith("invalid annotation annotations/xmls/cat_1.xml: ")
    assert broken["annotation"] == "annotations/xmls/cat_1.xml" and set(broken) == {"skip", "annotation"}
