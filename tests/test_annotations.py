"""detkit.data.annotations: every number of a Pascal VOC annotation checked, the field at fault named; the split."""

from __future__ import annotations

import pytest

from detkit.data.annotations import AnnotationError, parse_objects, split_rows

GOOD = {"width": "500", "height": "375", "xmin": "10", "ymin": "20.5", "xmax": "300", "ymax": "250",
        "difficult": "0", "truncated": "1"}


def voc(path, **values: str | None) -> str:
    """A VOC annotation with one object; a value of None leaves its element out."""
    v = {**GOOD, **values}

    def element(name: str) -> str:
        return "" if v[name] is None else f"<{name}>{v[name]}</{name}>"

    box = "".join(element(k) for k in ("xmin", "ymin", "xmax", "ymax"))
    path.write_text(f"<annotation><size>{element('width')}{element('height')}<depth>3</depth></size>"
                    f"<object><name>cat</name><pose>Frontal</pose>{element('truncated')}{element('difficult')}"
                    f"<bndbox>{box}</bndbox></object></annotation>")
    return str(path)


def test_a_good_annotation_is_read(tmp_path):
    size, objects = parse_objects(voc(tmp_path / "a.xml", width="500.0", difficult=None))
    assert size == (500, 375)
    assert objects == [{"name": "cat", "box": [10.0, 20.5, 300.0, 250.0], "difficult": 0, "truncated": 1,
                        "view": "Frontal"}]


def test_what_an_annotation_leaves_out_takes_its_default(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>9</xmax><ymax>8</ymax></bndbox>"
                   "</object></annotation>")
    assert parse_objects(str(xml)) == (None, [{"name": "", "box": [1.0, 2.0, 9.0, 8.0], "difficult": 0,
                                               "truncated": 0, "view": ""}])


@pytest.mark.parametrize("field, value, problem", [
    ("size/width", "inf", "not a finite number"),  # made a worker process raise OverflowError
    ("size/height", "nan", "not a finite number"),
    ("size/width", "0", "not a whole number of pixels, at least 1"),
    ("size/height", "-375", "not a whole number of pixels, at least 1"),
    ("size/width", "499.5", "not a whole number of pixels, at least 1"),
    ("size/height", "tall", "not a number"),
    ("size/width", None, "missing"),
    ("object[1]/bndbox/xmin", "nan", "not a finite number"),  # was written into a record as 'clipped'
    ("object[1]/bndbox/ymax", "1e999", "not a finite number"),  # float() reads it as infinity
    ("object[1]/bndbox/xmax", "-Infinity", "not a finite number"),
    ("object[1]/bndbox/ymin", "twenty", "not a number"),
    ("object[1]/bndbox/xmax", None, "missing"),
    ("object[1]/bndbox/ymin", " ", "missing"),
    ("object[1]/difficult", "2", "neither 0 nor 1"),
    ("object[1]/difficult", "nan", "not a finite number"),
    ("object[1]/truncated", "yes", "not a number"),
    ("object[1]/truncated", "0.5", "neither 0 nor 1"),
])
def test_a_bad_number_is_named_with_its_field_and_value(tmp_path, field, value, problem):
    with pytest.raises(AnnotationError) as err:
        parse_objects(voc(tmp_path / "a.xml", **{field.rsplit("/", 1)[1]: value}))
    assert (err.value.field, err.value.value, err.value.problem) == (field, value, problem)
    shown = "(absent)" if value is None else repr(value)
    assert str(err.value) == f"{field} {shown}: {problem}"


def test_the_object_at_fault_is_counted_from_one(tmp_path):
    xml = tmp_path / "a.xml"
    good = "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    xml.write_text(f"<annotation>{good}{good}<object><name>cat</name></object></annotation>")
    with pytest.raises(AnnotationError, match=r"^object\[3\]/bndbox \(absent\): missing$"):
        parse_objects(str(xml))


def test_the_split_is_the_pets_tools_for_its_seed_and_share():
    # Written out with the TF OD API's create_pet_tf_record.py (random.seed(seed), random.shuffle, the first
    # int(share * n) to train) on these rows, once: the expectation does not come from split_rows.
    rows = [f"cat_{i}" for i in range(1, 11)]
    assert split_rows(rows, 0.7, 42) == (["cat_8", "cat_4", "cat_3", "cat_9", "cat_6", "cat_7", "cat_10"],
                                         ["cat_5", "cat_1", "cat_2"])
    assert split_rows(rows, 0.75, 7) == (["cat_9", "cat_4", "cat_2", "cat_5", "cat_8", "cat_1", "cat_10"],
                                         ["cat_7", "cat_3", "cat_6"])
    assert rows == [f"cat_{i}" for i in range(1, 11)]  # the caller's list keeps its order
