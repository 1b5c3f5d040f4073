"""`make batch`: the demo's export over a folder of images, from a user's shell."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detkit.core.fsio import EXPORT_LABEL_MAP, newest_version
from detkit.eval.draw import PREDICTED
from detkit.serve import batch
from harness.repo_copy import make
from tests.conftest import REPO_ROOT
from tests.drawing import changed_elsewhere, outline_share

TOLERANCE = 1e-5  # normalised coordinates and scores: the batch's calls against one image per call
OUTPUT_KEYS = {"detection_boxes", "detection_classes", "detection_scores", "num_detections"}


@pytest.fixture(scope="module")
def images(tmp_path_factory, val_examples) -> tuple[Path, dict[str, bytes], list[str]]:
    """A folder of three good images (JPEG, PNG, one in a subfolder), a text file and a truncated JPEG:
    the folder, the good ones (rel -> bytes) and the bad ones."""
    folder = tmp_path_factory.mktemp("batch") / "images"
    png = io.BytesIO()
    Image.open(io.BytesIO(val_examples[1]["encoded"])).save(png, "PNG")
    truncated = val_examples[3]["encoded"]
    good = {
        val_examples[0]["filename"]: val_examples[0]["encoded"],
        f"{Path(val_examples[1]['filename']).stem}.png": png.getvalue(),
        f"more/{val_examples[2]['filename']}": val_examples[2]["encoded"],
    }
    bad = {"notes.txt": b"not a picture\n", val_examples[3]["filename"]: truncated[: len(truncated) // 2]}
    for rel, data in {**good, **bad}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder, good, sorted(bad)


@pytest.fixture(scope="module")
def expected(demo_repo, images) -> dict[str, dict[str, np.ndarray]]:
    """The export's answer for each good image, one image per signature call."""
    import tensorflow as tf

    version = newest_version(demo_repo / "models" / "export" / "pet_object_detection")
    signature = tf.saved_model.load(str(version)).signatures["serving_default"]
    return {rel: {k: v.numpy()[0] for k, v in signature(inputs=tf.constant([data])).items()}
            for rel, data in images[1].items()}


@pytest.fixture(scope="module")
def first_run(demo_repo, images, tmp_path_factory):
    output = tmp_path_factory.mktemp("batch") / "results"
    return output, make(demo_repo, "batch", f"INPUT={images[0]}", f"OUTPUT={output}")


def answer(output: Path, rel: str) -> dict:
    return json.loads((output / f"{rel}.json").read_text())


@pytest.mark.slow
def test_make_batch_answers_each_good_image_as_the_server_and_lists_the_bad(images, expected, first_run):
    _, good, bad = images
    output, result = first_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*.*.json")) == sorted(
        f"{rel}.json" for rel in good)
    listed = json.loads((output / "skipped.json").read_text())
    assert [entry["file"] for entry in listed] == bad
    reasons = {entry["file"]: entry["reason"] for entry in listed}
    truncated = next(rel for rel in bad if rel != "notes.txt")
    assert "not an image" in reasons["notes.txt"]
    assert "does not decode" in reasons[truncated], reasons
    for entry in listed:
        assert f"bad: {entry['file']}: {entry['reason']}" in result.stdout
    assert f"batch: 3 images done, 0 skipped as already done, 2 bad (listed in {output / 'skipped.json'})" \
        in result.stdout
    for rel, outputs in expected.items():
        predictions = answer(output, rel)["predictions"]
        assert len(predictions) == 1 and set(predictions[0]) == OUTPUT_KEYS
        for key, value in outputs.items():
            assert np.shape(predictions[0][key]) == value.shape, (rel, key)
            np.testing.assert_allclose(predictions[0][key], value, atol=TOLERANCE, err_msg=f"{rel} {key}")


@pytest.mark.slow
def test_make_batch_again_processes_nothing(demo_repo, images, first_run):
    output, _ = first_run
    answers = {p: p.stat().st_mtime_ns for p in output.rglob("*.*.json")}
    result = make(demo_repo, "batch", f"INPUT={images[0]}", f"OUTPUT={output}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing to do: all 3 images already have their outputs" in result.stdout
    assert "batch: 0 images done, 3 skipped as already done, 2 bad" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.*.json")} == answers


@pytest.mark.slow
def test_batch_coco_files_load_with_pycocotools_and_hold_the_exports_detections(images, expected, first_run):
    from pycocotools.coco import COCO

    folder, good, _ = images
    output, _ = first_run
    dataset = COCO(str(output / "images.json"))
    results = dataset.loadRes(str(output / "detections.json"))
    listed = sorted(dataset.dataset["images"], key=lambda image: image["id"])
    assert [(image["id"], image["file_name"]) for image in listed] == list(enumerate(sorted(good), start=1))
    for image in listed:
        rel = image["file_name"]
        width, height = Image.open(folder / rel).size
        assert (image["width"], image["height"]) == (width, height)
        outputs = expected[rel]
        count = int(outputs["num_detections"])
        ymin, xmin, ymax, xmax = outputs["detection_boxes"][:count].T
        boxes = np.stack([xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height], axis=1)
        detections = results.loadAnns(results.getAnnIds(imgIds=[image["id"]]))
        assert len(detections) == count > 0
        assert [d["category_id"] for d in detections] == outputs["detection_classes"][:count].astype(int).tolist()
        np.testing.assert_allclose([d["score"] for d in detections], outputs["detection_scores"][:count],
                                   atol=TOLERANCE)
        np.testing.assert_allclose([d["bbox"] for d in detections], boxes, atol=TOLERANCE * max(width, height))
    assert {c["id"] for c in dataset.dataset["categories"]} >= {d["category_id"] for d in results.anns.values()}


@pytest.mark.slow
def test_make_batch_draw_writes_the_drawn_images(demo_repo, images, first_run, tmp_path):
    folder, good, _ = images
    output = Path(shutil.copytree(first_run[0], tmp_path / "results"))
    result = make(demo_repo, "batch", f"INPUT={folder}", f"OUTPUT={output}", "DRAW=1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch: 3 images done" in result.stdout  # the answers were there, the drawings not
    for rel in good:
        drawn, original = Image.open(output / f"{rel}_detections.png"), Image.open(folder / rel)
        assert drawn.size == original.size
        # The answer's best detections (at most 5, score 0.3 or more) where they are, and nothing else.
        prediction = answer(output, rel)["predictions"][0]
        count = int(prediction["num_detections"])
        ranked = zip(prediction["detection_boxes"][:count], prediction["detection_scores"][:count])
        boxes = [box for box, score in ranked if score >= 0.3][:5]
        assert boxes, rel
        assert [outline_share(drawn, box, [PREDICTED]) for box in boxes] == pytest.approx([1.0] * len(boxes), abs=0.1)
        assert changed_elsewhere(original, drawn, boxes) == 0, rel


@pytest.mark.slow
def test_make_batch_without_input_prints_usage(demo_repo, tmp_path):
    result = make(demo_repo, "batch", f"OUTPUT={tmp_path}")
    assert result.returncode != 0
    assert "usage: make batch INPUT=" in result.stdout


def test_batch_refuses_a_missing_or_empty_input_and_a_half_s3_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in (([str(tmp_path / "missing"), str(tmp_path / "out")], "INPUT does not exist"),
                          ([str(tmp_path / "empty"), str(tmp_path / "out")], "INPUT holds no files"),
                          (["s3://bucket/images", str(tmp_path / "out")], "both must be s3://")):
        assert batch.main([*argv, "--export", str(tmp_path / "export")]) == 2
        assert message in capsys.readouterr().err


def test_batch_lists_each_path_it_does_not_read_and_never_blocks(tmp_path):
    # None of these is opened: the FIFOs would block the run, /dev/zero would never end. Nothing here
    # is an image file, so no model is loaded: an export folder with its label map is enough.
    outside, folder, output = tmp_path / "outside", tmp_path / "in", tmp_path / "out"
    outside.mkdir()
    (outside / "cat.jpg").write_bytes(b"\xff\xd8\xff outside INPUT")
    os.mkfifo(outside / "fifo")  # nobody writes to it: opening it for reading would wait forever
    (folder / "sub").mkdir(parents=True)
    os.mkfifo(folder / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "socket"))
    links = {"loop": "loop", "ping": "pong", "pong": "ping", "dangling.jpg": "missing.jpg",
             "to-fifo": "fifo", "out-fifo": "../outside/fifo", "out-file.jpg": "../outside/cat.jpg",
             "zero": "/dev/zero", "sub/up": ".."}
    for link, target in links.items():
        (folder / link).symlink_to(target)
    label_map = tmp_path / "export" / "pets" / "1" / EXPORT_LABEL_MAP
    label_map.parent.mkdir(parents=True)
    label_map.write_text("item { id: 1 name: 'cat' }\n")

    result = subprocess.run([sys.executable, "-m", "detkit.serve.batch", str(folder), str(output),
                             "--export", str(tmp_path / "export" / "pets")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    reasons = {entry["file"]: entry["reason"] for entry in json.loads((output / "skipped.json").read_text())}
    assert reasons == {
        "fifo": "a FIFO (named pipe): not read",
        "socket": "a socket: not read",
        "loop": "link loop: 'loop' leads back to a link on its way",
        "ping": "link loop: 'pong' leads back to a link on its way",
        "pong": "link loop: 'ping' leads back to a link on its way",
        "dangling.jpg": "dangling link: 'missing.jpg' does not exist",
        "to-fifo": "link to a FIFO (named pipe): not read",
        "out-fifo": f"link to '{outside / 'fifo'}', outside INPUT: not followed",
        "out-file.jpg": f"link to '{outside / 'cat.jpg'}', outside INPUT: not followed",
        "zero": "link to '/dev/zero', outside INPUT: not followed",
        "sub/up": "link to a folder: not followed (the files in INPUT are read under their own paths)",
    }
    for rel, reason in reasons.items():
        assert f"bad: {rel}: {reason}" in result.stdout
    assert json.loads((output / "images.json").read_text())["images"] == []
    assert sorted(p.name for p in output.iterdir()) == ["detections.json", "images.json", "skipped.json"]


def export_without_a_model(root: Path) -> Path:
    """An export folder with a version and its label map: enough for a run that has no image left to read."""
    label_map = root / "export" / "pets" / "1" / EXPORT_LABEL_MAP
    label_map.parent.mkdir(parents=True)
    label_map.write_text("item { id: 1 name: 'cat' }\n")
    return root / "export" / "pets"


def test_a_stopped_run_resumes_without_reading_what_is_done_or_known_bad(tmp_path, capsys):
    folder, output = tmp_path / "in", tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    good = {"a.jpg": (40, 30), "sub/b.png": (20, 10)}
    for rel, size in good.items():
        Image.new("RGB", size, (200, 120, 40)).save(folder / rel)
    (folder / "notes.txt").write_text("not a picture\n")
    (folder / "images").write_bytes(b"\xff\xd8\xff")  # its answer would be OUTPUT/images.json
    os.mkfifo(folder / "fifo")
    box = {"detection_boxes": [[0.1, 0.2, 0.5, 0.6]], "detection_classes": [1.0], "detection_scores": [0.9],
           "num_detections": 1.0}
    for rel in good:  # what the stopped run had written
        (output / rel).parent.mkdir(parents=True, exist_ok=True)
        (output / f"{rel}.json").write_text(json.dumps({"predictions": [box]}))
    notes = folder / "notes.txt"
    stamp = [notes.stat().st_size, notes.stat().st_mtime_ns]
    (output / "skipped.json").write_text(json.dumps([{"file": "notes.txt", "reason": "not an image (so it said)",
                                                      "stamp": stamp}]))

    # No model: an image left to read would need one, and this export has none.
    assert batch.main([str(folder), str(output), "--export", str(export_without_a_model(tmp_path))]) == 0

    bad = {"fifo": "a FIFO (named pipe): not read", "images": "its output would overwrite OUTPUT/images.json",
           "notes.txt": "not an image (so it said)"}
    assert capsys.readouterr().out.splitlines() == [
        *(f"bad: {rel}: {reason}" for rel, reason in bad.items()),
        "nothing to do: all 2 images already have their outputs, and the bad files are unchanged",
        f"batch: 0 images done, 2 skipped as already done, 3 bad (listed in {output / 'skipped.json'}); 0.0 s, "
        f"0.0 images/s (model load 0.0 s); {output / 'images.json'} and {output / 'detections.json'}: 2 images, "
        "2 detections"]
    images = folder / "images"
    assert json.loads((output / "skipped.json").read_text()) == [
        {"file": "fifo", "reason": bad["fifo"], "stamp": None},  # never read: judged anew each run
        {"file": "images", "reason": bad["images"], "stamp": [images.stat().st_size, images.stat().st_mtime_ns]},
        {"file": "notes.txt", "reason": bad["notes.txt"], "stamp": stamp}]
    assert [(i["file_name"], i["width"], i["height"]) for i in json.loads((output / "images.json").read_text())[
        "images"]] == [("a.jpg", 40, 30), ("sub/b.png", 20, 10)]


def test_a_bad_file_is_judged_anew_once_it_changed_or_was_never_read(tmp_path):
    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    output.mkdir()
    for name in ("notes.txt", "todo.txt", "gone.txt"):
        (folder / name).write_text("not a picture\n")
    stamps = {name: batch.stamp(folder / name) for name in ("notes.txt", "todo.txt", "gone.txt")}
    (folder / "gone.txt").unlink()
    (output / "skipped.json").write_text(json.dumps([
        {"file": "notes.txt", "reason": "not an image", "stamp": stamps["notes.txt"]},
        {"file": "todo.txt", "reason": "cannot draw it", "stamp": None},
        {"file": "gone.txt", "reason": "not an image", "stamp": stamps["gone.txt"]}]))
    assert batch.known_bad(folder, output) == {"notes.txt": "not an image"}
    (folder / "notes.txt").write_text("changed, and longer than before\n")
    assert batch.known_bad(folder, output) == {}
    (output / "skipped.json").write_text("[{")  # a stopped run cut it short (atomic writes make that rare)
    assert batch.known_bad(folder, output) == {}
    (output / "skipped.json").unlink()
    assert batch.known_bad(folder, output) == {}


def test_output_that_is_a_file_or_the_input_itself_is_refused(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "out.txt").write_text("")
    (tmp_path / "file.jpg").write_bytes(b"\xff\xd8\xff")
    export = str(export_without_a_model(tmp_path))
    for argv, message in (([str(folder), str(tmp_path / "out.txt")], f"{tmp_path / 'out.txt'}: OUTPUT is a file, "
                                                                      "not a folder"),
                          ([str(folder), str(folder / "." / "")], f"{folder}: OUTPUT must not be INPUT: the outputs "
                                                                  "would be taken for inputs"),
                          ([str(tmp_path / "file.jpg"), str(tmp_path / "out")], f"{tmp_path / 'file.jpg'}: INPUT is "
                                                                                "not a folder"),
                          ([str(folder), str(tmp_path / "o"), "--batch-size", "0"], "batch size 0: must be at least "
                                                                                    "1")):
        assert batch.main([*argv, "--export", export]) == 2
        assert message in capsys.readouterr().err, message
    assert batch.main([str(folder), str(tmp_path / "o"), "--export", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none'}: no exported version (run the export stage" in capsys.readouterr().err


def png_of_size(width: int, height: int) -> bytes:
    """A PNG header of that size, and no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_files_are_told_by_their_first_bytes_and_a_broken_header_is_named(tmp_path):
    heads = {"JPEG": b"\xff\xd8\xff\xe0", "PNG": b"\x89PNG\r\n\x1a\n", "GIF": b"GIF87a", "BMP": b"BM",
             "WebP": b"RIFF\x00\x00\x00\x00WEBP"}
    assert {kind: batch.image_format(head + b"\x00" * 4) for kind, head in heads.items()} == {k: k for k in heads}
    assert batch.image_format(b"GIF89a" + b"\x00" * 6) == "GIF"
    assert batch.image_format(b"RIFF\x00\x00\x00\x00WAVE") is None  # RIFF, but sound
    assert batch.image_format(b"\xff\xd8\x00\x00") is None
    (tmp_path / "a.png").write_bytes(png_of_size(100_000, 100_000))  # Pillow refuses to open it: a bomb
    (tmp_path / "b.gif").write_bytes(b"GIF89a")
    (tmp_path / "c.txt").write_text("GIF")
    assert batch.read_picture(tmp_path, "a.png").startswith(
        "broken PNG header: Image size (10000000000 pixels) exceeds limit of ")
    assert batch.read_picture(tmp_path, "b.gif") == "starts like a GIF file but is none: its header does " \
                                                               "not parse"
    assert batch.read_picture(tmp_path, "c.txt") == batch.NOT_AN_IMAGE
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (12, 7)).save(tmp_path / "sub" / "d.bmp")
    picture = batch.read_picture(tmp_path, "sub/d.bmp")
    assert (picture.rel, picture.data, picture.width, picture.height) == (
        "sub/d.bmp", (tmp_path / "sub" / "d.bmp").read_bytes(), 12, 7)


def test_batches_are_full_and_carry_the_bad_files_read_while_filling_them(tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    order = ["a.png", "x.txt", "b.png", "c.png", "d.png", "y.txt", "e.png"]
    batches = [([p.rel for p in b.pictures], [rel for rel, _ in b.bad])
               for b in batch.read_batches(tmp_path, order, 2)]
    assert batches == [(["a.png", "b.png"], ["x.txt"]), (["c.png", "d.png"], []), (["e.png"], ["y.txt"])]
    assert [([p.rel for p in b.pictures], [rel for rel, _ in b.bad])
            for b in batch.read_batches(tmp_path, ["a.png", "b.png", "x.txt"], 2)] == [
        (["a.png", "b.png"], []), ([], ["x.txt"])]
