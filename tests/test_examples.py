"""detkit.data.examples: what a worker process reports about the file it was on."""

from __future__ import annotations

import functools

import pytest
from PIL import Image

from detkit.data.examples import ExampleError, ShardJob, Task, shard_mapper, write_shard

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
