"""stages.tfrecord on the embedded sample: TF OD API examples, label map, quirks, determinism."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from lxml import etree

from detkit.config import load_config
from detkit.data import annotations
from detkit.data.labelmap import pets_class_name, read_label_map
from detkit.data.records import feature_spec
from harness.repo_copy import REPO_ROOT
from sample.make_sample import CLASSES, QUIRKS
from stages import tfrecord

# libjpeg's warning messages (jerror.h): the file decodes, but TensorFlow prints one on every decode.
LIBJPEG_WARNING = re.compile(r"Corrupt JPEG data|Premature end of JPEG file|Invalid SOS parameters|"
                             r"Inconsistent progression sequence|unknown JFIF revision|Unknown Adobe color transform")


def read_examples(records):
    spec = feature_spec()
    examples = {}
    for split in ("train", "val"):
        files = sorted(str(p) for p in records.glob(f"{split}-*.tfrecord"))
        for serialized in tf.data.TFRecordDataset(files):
            ex = tf.io.parse_single_example(serialized, spec)
            ex = {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in ex.items()}
            examples[ex["image/filename"].numpy().decode()] = (split, ex)
    return examples


@pytest.fixture(scope="module")
def examples(sample_records):
    return read_examples(sample_records)


@pytest.fixture(scope="module")
def stats(sample_records):
    return json.loads((sample_records / "stats.json").read_text())


def test_label_map_is_the_pets_one(sample_records):
    label_map = read_label_map(sample_records / "label_map.pbtxt")
    assert label_map == {i: name for i, name in enumerate(CLASSES, start=1)}
    assert label_map[1] == "Abyssinian" and label_map[37] == "yorkshire_terrier"


def test_every_example_decodes_and_matches_its_size(examples):
    assert len(examples) > 300
    for name, (_, ex) in examples.items():
        assert ex["image/format"].numpy() == b"jpeg"
        image = tf.io.decode_jpeg(ex["image/encoded"], channels=0)
        assert image.shape[2] == 3, name
        assert image.shape[:2] == (ex["image/height"], ex["image/width"]), name
        assert ex["image/source_id"].numpy().decode() == name


def test_boxes_and_labels_match_xml_and_label_map(examples, sample_raw, sample_records):
    label_map = read_label_map(sample_records / "label_map.pbtxt")
    clipped = {f"{s}.jpg" for s in QUIRKS["box_outside"]}
    checked = 0
    for name, (_, ex) in examples.items():
        breed = pets_class_name(name.rsplit(".", 1)[0])
        assert [t.decode() for t in ex["image/object/class/text"].numpy()] == [breed]
        assert [label_map[int(i)] for i in ex["image/object/class/label"].numpy()] == [breed]
        box = np.array([ex[f"image/object/bbox/{k}"].numpy()[0] for k in ("xmin", "ymin", "xmax", "ymax")])
        assert np.all((box >= 0) & (box <= 1)), name
        assert box[0] < box[2] and box[1] < box[3], name
        xml = etree.parse(str(sample_raw / "annotations" / "xmls" / name.replace(".jpg", ".xml")))
        w, h = int(ex["image/width"]), int(ex["image/height"])
        raw = np.array([float(xml.findtext(f"object/bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")])
        expected = np.clip(raw / [w, h, w, h], 0, 1)
        np.testing.assert_allclose(box, expected, atol=1e-6, err_msg=name)
        if name in clipped:
            assert not np.allclose(raw / [w, h, w, h], expected), "the quirk box should need clipping"
        checked += 1
    assert checked == len(examples)


# The val list of the embedded sample under the Pets tool's split, pinned: sha256 of its stems in order,
# newline-joined. Derived once with pets_tool_split below (the tool's own steps, not detkit's code).
SAMPLE_VAL_SHA256 = "a4f37dc12d0d1357662a34d139a5443811905c627f455f1482ac8a53feb8a481"


UNUSABLE = {stem for quirk in ("truncated", "corrupt", "no_xml") for stem in QUIRKS[quirk]}  # the sample's


def pets_tool_split(raw):
    """The TF OD API's create_pet_tf_record.py, step by step: read_examples_list (each line's first
    word), random.seed(42), random.shuffle, the first int(0.7 * n) to train, the rest to val."""
    lines = (raw / "annotations" / "trainval.txt").read_text().splitlines(keepends=True)
    examples = [line.strip().split(" ")[0] for line in lines]
    state = random.getstate()  # the tool seeds the global generator; leave it as the other tests found it
    random.seed(42)
    random.shuffle(examples)
    random.setstate(state)
    num_train = int(0.7 * len(examples))
    return examples[:num_train], examples[num_train:]


def test_split_is_the_pets_tools_seeded_70_30(examples, sample_raw):
    train, val = pets_tool_split(sample_raw)
    assert (len(train), len(val)) == (314, 135)
    assert hashlib.sha256("\n".join(val).encode()).hexdigest() == SAMPLE_VAL_SHA256
    for split, stems in (("train", train), ("val", val)):  # every row but the sample's unusable files
        written = sorted(name.rsplit(".", 1)[0] for name, (s, _) in examples.items() if s == split)
        assert written == sorted(set(stems) - UNUSABLE), split


def entries(stats, kind):
    return {e["file"]: e for e in stats[kind]}


@pytest.mark.parametrize("quirk, reason", [
    ("gif", "GIF bytes behind a .jpg name"),
    ("png", "PNG bytes behind a .jpg name"),
    ("rgba", "alpha channel flattened"),
    ("grayscale", "mode L converted to RGB"),
    ("cmyk", "mode CMYK converted to RGB"),
    ("box_outside", "clipped"),
    ("dirty", "libjpeg warning: Corrupt JPEG data: 240 extraneous bytes before marker 0xd9; re-encoded"),
])
def test_repairable_quirks_are_kept_and_listed(quirk, reason, stats, examples):
    repaired = entries(stats, "repaired")
    for stem in QUIRKS[quirk]:
        assert f"{stem}.jpg" in examples, f"{stem} should be kept"
        assert any(reason in r for r in repaired[f"images/{stem}.jpg"]["reasons"]), repaired.get(f"images/{stem}.jpg")


def test_plain_jpegs_are_stored_byte_for_byte(examples, stats, sample_raw):
    repaired = {entry["file"].split("/")[1] for entry in stats["repaired"]}
    plain = [name for name in examples if name not in repaired]
    assert len(plain) > 300
    for name in plain:
        assert examples[name][1]["image/encoded"].numpy() == (sample_raw / "images" / name).read_bytes(), name


def test_tensorflow_decodes_every_record_without_a_libjpeg_warning(sample_records, stats):
    # libjpeg writes its warnings from C straight to file descriptor 2: a child's captured stderr holds them.
    shards = sorted(str(p) for p in sample_records.glob("*.tfrecord"))
    result = subprocess.run([sys.executable, "-m", "tests.programs", "decode", *shards], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout) == sum(split["examples"] for split in stats["splits"].values())
    warnings = [line for line in result.stderr.splitlines() if LIBJPEG_WARNING.search(line)]
    assert not warnings, f"TensorFlow's libjpeg warned on decoding the stage's records: {warnings}"


@pytest.mark.parametrize("quirk, reason", [
    ("truncated", "undecodable image"),
    ("corrupt", "undecodable image"),
    ("no_xml", "no XML annotation"),
])
def test_unusable_files_are_skipped_and_listed(quirk, reason, stats, examples):
    skipped = entries(stats, "skipped")
    for stem in QUIRKS[quirk]:
        assert f"{stem}.jpg" not in examples
        assert reason in skipped[f"images/{stem}.jpg"]["reason"]


def test_stray_files_are_ignored_and_listed(stats):
    ignored = entries(stats, "ignored")
    for name in QUIRKS["stray"]:
        assert "not an image file" in ignored[f"images/{name}"]["reason"]
    assert "AppleDouble" in ignored["images/._Abyssinian_1.jpg"]["reason"]


def test_stats_count_what_was_written(stats, examples):
    for split in ("train", "val"):
        written = [n for n, (s, _) in examples.items() if s == split]
        assert stats["splits"][split]["examples"] == len(written)
        assert sum(stats["splits"][split]["per_class"].values()) == stats["splits"][split]["boxes"]
    assert stats["num_classes"] == 37


def test_same_inputs_give_byte_identical_shards(sample_raw, sample_records, cfg, tmp_path):
    tfrecord.run(cfg, {"raw": sample_raw}, {"records": tmp_path / "again"}, workers=1)
    first = sorted(p.name for p in sample_records.iterdir())
    assert first == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in first:
        assert (sample_records / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_voc_layout_takes_classes_from_xml(sample_raw, tmp_path):
    data = tmp_path / "voc"
    (data / "images").mkdir(parents=True)
    (data / "annotations" / "xmls").mkdir(parents=True)
    for stem in ("Abyssinian_1", "Abyssinian_2", "Bengal_1", "beagle_1", "beagle_2", "pug_1"):
        shutil.copy(sample_raw / "images" / f"{stem}.jpg", data / "images")
        shutil.copy(sample_raw / "annotations" / "xmls" / f"{stem}.xml", data / "annotations" / "xmls")
    (data / "label_map.pbtxt").write_text("item { id: 1 name: 'cat' }\nitem { id: 2 name: 'dog' }\n")
    cfg = load_config(overrides=["dataset=voc_custom", f"dataset.local_dir={data}"])
    stats = tfrecord.run(cfg, {"raw": data}, {"records": tmp_path / "records"})
    assert stats["splits"]["train"]["examples"] + stats["splits"]["val"]["examples"] == 6
    examples = read_examples(tmp_path / "records")
    for name, (_, ex) in examples.items():
        expected = "cat" if name[0].isupper() else "dog"
        assert [t.decode() for t in ex["image/object/class/text"].numpy()] == [expected]
        assert list(ex["image/object/class/label"].numpy()) == [1 if expected == "cat" else 2]


def test_malformed_list_row_names_file_and_line_and_keeps_old_output(sample_raw, cfg, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(sample_raw / "annotations", raw / "annotations")
    (raw / "images").mkdir()
    trainval = raw / "annotations" / "trainval.txt"
    lines = trainval.read_text().splitlines()
    lines[2] = "Abyssinian_3 one 1 1"
    trainval.write_text("\n".join(lines) + "\n")
    out = tmp_path / "records"
    out.mkdir()
    (out / "keep.txt").write_text("previous output")
    with pytest.raises(annotations.DatasetError, match=r"trainval.txt:3: expected"):
        tfrecord.run(cfg, {"raw": raw}, {"records": out})
    assert (out / "keep.txt").read_text() == "previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "records"]


def test_missing_list_file_is_named(cfg, tmp_path):
    (tmp_path / "raw" / "annotations").mkdir(parents=True)
    assert tfrecord.main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                          "--params", "params.yaml"]) == 2
    with pytest.raises(annotations.DatasetError, match="annotations/trainval.txt: missing"):
        tfrecord.run(cfg, {"raw": tmp_path / "raw"}, {"records": tmp_path / "out"})
    assert not (tmp_path / "out").exists()


def test_process_pool_writes_what_one_process_writes(sample_raw, cfg, tmp_path):
    # More processes than cores: every shard is its own job, finished in any order.
    tfrecord.run(cfg, {"raw": sample_raw}, {"records": tmp_path / "pool"}, workers=3)
    tfrecord.run(cfg, {"raw": sample_raw}, {"records": tmp_path / "one"}, workers=1)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "pool").iterdir())
    for name in names:  # stats.json too: its lists follow the task order, not the finishing order
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "pool"]  # no temporary left beside


def test_shards_take_rows_round_robin_like_the_pets_tool(sample_raw, sample_records, stats, cfg):
    # create_pet_tf_record writes row i to shard i % num_shards, counting rows it skips.
    spec = feature_spec()
    for split, split_stems in zip(("train", "val"), pets_tool_split(sample_raw)):
        count = cfg.tfrecord[f"{split}_shards"]
        for number, name in enumerate(stats["splits"][split]["shards"]):
            stems = [tf.io.parse_single_example(r, spec)["image/filename"].numpy().decode().split(".")[0]
                     for r in tf.data.TFRecordDataset(str(sample_records / name))]
            expected = [stem for i, stem in enumerate(split_stems) if i % count == number and stem not in UNUSABLE]
            assert stems == expected, name


def floats_of_every_record(records) -> list[float]:
    """Every float of every feature of every record, whatever its key."""
    values = []
    for shard in sorted(records.glob("*.tfrecord")):
        for serialized in tf.data.TFRecordDataset(str(shard)):
            for feature in tf.train.Example.FromString(serialized.numpy()).features.feature.values():
                values += feature.float_list.value
    return values


def test_every_float_written_from_the_sample_is_finite(sample_records, examples):
    values = floats_of_every_record(sample_records)
    assert len(values) == 4 * len(examples)  # the box of each example: nothing else is a float
    assert all(np.isfinite(values))


# (stem, field, value): an annotation value each row's XML gets instead of its own.
BAD_VALUES = [
    ("Abyssinian_1", "size/width", "inf"),  # made a worker process raise, and the stage end unnamed
    ("Abyssinian_2", "object[1]/bndbox/xmin", "nan"),  # was written into the record, reported as 'clipped'
    ("Bengal_1", "object[1]/bndbox/ymax", "1e999"),
    ("Bengal_2", "size/height", "tall"),
    ("beagle_1", "object[1]/difficult", "2"),
    ("beagle_2", "object[1]/truncated", "yes"),
    ("pug_1", "object[1]/bndbox/xmax", "-Infinity"),
]


def test_bad_annotation_values_skip_their_rows_by_name_and_the_stage_runs_to_the_end(sample_raw, tmp_path):
    data = tmp_path / "voc"
    (data / "images").mkdir(parents=True)
    (data / "annotations" / "xmls").mkdir(parents=True)
    good = ["Abyssinian_3", "Bengal_3", "beagle_3", "pug_2"]
    for stem in good + [stem for stem, _, _ in BAD_VALUES]:
        shutil.copy(sample_raw / "images" / f"{stem}.jpg", data / "images")
        shutil.copy(sample_raw / "annotations" / "xmls" / f"{stem}.xml", data / "annotations" / "xmls")
    for stem, field, value in BAD_VALUES:
        xml = data / "annotations" / "xmls" / f"{stem}.xml"
        tree = etree.parse(str(xml))
        tree.find(field.replace("[1]", "")).text = value
        tree.write(str(xml))
    (data / "label_map.pbtxt").write_text("item { id: 1 name: 'cat' }\nitem { id: 2 name: 'dog' }\n")
    cfg = load_config(overrides=["dataset=voc_custom", f"dataset.local_dir={data}"])

    stats = tfrecord.run(cfg, {"raw": data}, {"records": tmp_path / "records"}, workers=2)

    skipped = entries(stats, "skipped")
    assert sorted(skipped) == sorted(f"images/{stem}.jpg" for stem, _, _ in BAD_VALUES)
    for stem, field, value in BAD_VALUES:
        entry = skipped[f"images/{stem}.jpg"]
        annotation = f"annotations/xmls/{stem}.xml"
        assert (entry["annotation"], entry["field"], entry["value"]) == (annotation, field, value)
        assert entry["reason"].startswith(f"invalid annotation {annotation}: {field} '{value}': ")
    written = json.loads((tmp_path / "records" / "stats.json").read_text())
    assert written["skipped"] == stats["skipped"]
    assert sum(split["examples"] for split in stats["splits"].values()) == len(good)
    values = floats_of_every_record(tmp_path / "records")
    assert len(values) == 4 * len(good) and all(np.isfinite(values))
