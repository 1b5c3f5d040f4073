"""A seeded, bounded fuzzer over everything that reads files from strangers: images in five formats
(the demo's, from the sample, and the hostile ones of ``harness.images``), truncated, with flipped
bytes, altered header fields and inflated sizes and counts, through the export's signature
in-process, through nginx (`make serve`'s stack), through `make batch`; and the sample's annotation
XMLs, truncated, flipped, with strange numbers and inflated object counts, through the tfrecord stage.

Every case must end in an answer: 200 or a 4xx JSON, a listed skip, a row written or named in
``stats.json``; no 5xx, every number finite, within a time bound, and the processes' peak memory
under a bound.

Hypothesis draws the cases, derandomized (the same cases on every run). `make test` runs the
``suite`` profile (well under a minute of cases); `make fuzz` runs the ``fuzz`` profile, many more
(``HYPOTHESIS_PROFILE=fuzz``). `make batch` and the tfrecord stage take seconds to start, so
they run once over all their cases (``drawn``) rather than once a case."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from detkit.core.fsio import newest_version
from harness.images import gif_of_frames, jpeg_with_scans, png_declaring
from harness.memory import peaks, reset_peaks
from harness.repo_copy import REPO_ROOT, VENV, user_env
from harness.serving import descendants
from sample.make_sample import QUIRKS

pytestmark = pytest.mark.slow

COMMON = {"derandomize": True, "deadline": None, "database": None,
          "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
settings.register_profile("suite", max_examples=150, **COMMON)
settings.register_profile("fuzz", max_examples=2000, **COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "suite")
settings.load_profile(PROFILE)
BATCH_CASES = {"suite": 60, "fuzz": 600}[PROFILE]
XML_CASES = {"suite": 80, "fuzz": 800}[PROFILE]

ANSWER_S = 10.0  # the slowest answer allowed for one request (at most a few hundred KB)
# Memory: what the cases may add to a process that has the model loaded already (this test process,
# the serving stack's processes together), and the peak of a run started for them (make batch's
# processes together, the tfrecord stage's); the model alone takes about 0.9 GB.
GROWTH_GB = 0.5
PEAK_GB = 2.0
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "application/x-image",
                 "BMP": "application/x-image"}


def drawn(strategy, count: int) -> list:
    """``count`` cases of ``strategy`` as Hypothesis draws them under the profile, for a program that runs
    once over all of them (a test of one drawn list would get one list: Hypothesis's simplest, the same
    case over and over). Not shrunk: an assertion names its case."""
    cases = []

    @settings(max_examples=count, phases=[Phase.generate])
    @given(strategy)
    def collect(case):
        cases.append(case)

    collect()
    return cases


@pytest.fixture(scope="module")
def seeds(val_examples) -> list[tuple[str, bytes]]:
    """(format, bytes) the mutations start from: two of the demo's val images, small, in every format;
    a progressive JPEG; and hostile ones, each refused whole and one altered field away from something
    else: a PNG declaring 20000 x 20000, a complete PNG of 8000 x 8000 (190 KB, 190 MB decoded), a GIF
    whose second frame, 12000 x 12000, lies far past its 48 x 40 canvas (110 KB, 430 MB decoded), a
    JPEG of 100 scans."""
    pictures = [Image.open(io.BytesIO(example["encoded"])).convert("RGB").resize((48, 40))
                for example in val_examples[:2]]
    out = []
    for picture in pictures:
        for kind in FORMATS:
            buffer = io.BytesIO()
            picture.save(buffer, kind)
            out.append((kind, buffer.getvalue()))
    buffer = io.BytesIO()
    pictures[0].save(buffer, "JPEG", progressive=True)
    progressive = buffer.getvalue()
    return [*out, ("JPEG", progressive), ("PNG", png_declaring(20000, 20000)), ("PNG", png_declaring(8000, 8000, None)),
            ("GIF", gif_of_frames((48, 40), [(0, 0, 48, 40), (0, 0, 12000, 12000)])),
            ("JPEG", jpeg_with_scans(progressive, 100))]


def header_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the fields where an image states its sizes and counts: what a
    decoder allocates by."""
    fields: list[tuple[int, str]] = []
    if data.startswith(b"\x89PNG"):
        fields = [(16, ">I"), (20, ">I")]  # IHDR width, height
    elif data.startswith(b"GIF"):
        fields = [(6, "<H"), (8, "<H")]  # logical screen
        table = 3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0
        frame = data.find(b"\x2c", 13 + table)
        if frame > 0:
            fields += [(frame + 1 + 2 * k, "<H") for k in range(4)]  # first frame's left, top, width, height
    elif data.startswith(b"BM"):
        fields = [(2, "<I"), (10, "<I"), (18, "<i"), (22, "<i"), (28, "<H"), (46, "<I")]  # sizes, bits, colours
    elif data.startswith(b"RIFF"):
        fields = [(4, "<I"), (16, "<I")]  # RIFF and first chunk lengths
        start = data.find(b"\x9d\x01\x2a")  # VP8 key frame: width and height follow
        if start > 0:
            fields += [(start + 3, "<H"), (start + 5, "<H")]
    elif data.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):  # baseline or progressive frame header: its length,
            frame = data.find(marker)  # height, width and components
            if frame > 0:
                fields += [(frame + 2, ">H"), (frame + 5, ">H"), (frame + 7, ">H"), (frame + 9, ">B")]
        scan = data.find(b"\xff\xda")
        if scan > 0:
            fields.append((scan + 4, ">B"))  # components in the scan
    return [(at, fmt) for at, fmt in fields if at + struct.calcsize(fmt) <= len(data)]


def mutated_images(seeds_count: int):
    mutation = st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, 4000), st.just(0)),
        st.tuples(st.just("flip"), st.integers(0, 4000), st.integers(1, 255)),
        st.tuples(st.just("byte"), st.integers(0, 40), st.integers(0, 255)),
        st.tuples(st.just("field"), st.integers(0, 15), st.integers(0, 2**32 - 1)),
    )
    # No mutation at all: the seed as it is, answered.
    return st.tuples(st.integers(0, seeds_count - 1), st.lists(mutation, min_size=0, max_size=4))


def apply(data: bytes, mutations) -> bytes:
    for kind, where, value in mutations:
        if kind == "truncate":
            data = data[:where % (len(data) + 1)]
        elif kind == "field":
            fields = header_fields(data)
            if fields:
                at, fmt = fields[where % len(fields)]
                size = struct.calcsize(fmt)
                value %= 1 << (8 * size)
                value -= (1 << (8 * size)) if fmt[-1].islower() and value >= 1 << (8 * size - 1) else 0
                data = data[:at] + struct.pack(fmt, value) + data[at + size:]
        elif data:
            where %= len(data)
            data = data[:where] + bytes([data[where] ^ value if kind == "flip" else value]) + data[where + 1:]
    return data


def finite(value) -> bool:
    return all(math.isfinite(x) for x in np.asarray(value, dtype=float).ravel())


def measured(cmd: list[str], figures: Path, cwd: Path = REPO_ROOT) -> tuple[subprocess.CompletedProcess, float]:
    """``cmd`` from a user's shell under ``benchmarks.peak_rss`` (killed at twice the bound), and the
    most its processes held at once, in GB."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.peak_rss", "--json", str(figures),
                             "--limit-gb", str(2 * PEAK_GB), "--", *cmd],
                            cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=900)
    return result, json.loads(figures.read_text())["peak_tree_gb"]


@pytest.fixture(scope="module")
def signature(demo_repo):
    import tensorflow as tf

    return tf.saved_model.load(str(newest_version(demo_repo / "models" / "export" / "pet_object_detection"))
                               ).signatures["serving_default"]


def test_mutated_images_in_process_are_answered_or_refused(seeds, signature):
    import tensorflow as tf

    seen = {"answered": 0, "refused": 0}
    started_all, before = time.perf_counter(), reset_peaks([os.getpid()])

    @given(mutated_images(len(seeds)))
    def case(drawn_case):
        index, mutations = drawn_case
        data = apply(seeds[index][1], mutations)
        started = time.perf_counter()
        try:
            outputs = signature(inputs=tf.constant([data]))
        except tf.errors.InvalidArgumentError:  # what TF Serving answers with a 400
            seen["refused"] += 1
        else:
            assert all(finite(v.numpy()) for v in outputs.values()), (index, mutations)
            seen["answered"] += 1
        assert time.perf_counter() - started < ANSWER_S, (index, mutations)

    case()
    peak = peaks([os.getpid()])
    print(f"fuzz, in-process: {sum(seen.values())} cases {seen} in {time.perf_counter() - started_all:.1f} s; "
          f"peak memory of this process {peak / 1e9:.2f} GB, {(peak - before) / 1e9:.2f} GB over its start")
    assert seen["answered"] and seen["refused"]  # the cases reach both ends, not only one
    assert peak - before < GROWTH_GB * 1e9


def test_mutated_images_through_nginx_get_200_or_a_4xx_json(seeds, served):
    statuses: dict[int, int] = {}
    stack = [served.process.pid, *descendants(served.process.pid)]
    started_all, before = time.perf_counter(), reset_peaks(stack)

    @given(mutated_images(len(seeds)))
    def case(drawn_case):
        index, mutations = drawn_case
        kind, data = seeds[index][0], apply(seeds[index][1], mutations)
        started = time.perf_counter()
        answer = requests.post(served.invocations_url, data=data, timeout=ANSWER_S * 3,
                               headers={"Content-Type": CONTENT_TYPES[kind]})
        assert time.perf_counter() - started < ANSWER_S, (index, mutations)
        assert answer.status_code == 200 or 400 <= answer.status_code < 500, (answer.status_code, answer.text)
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        body = answer.json()
        if answer.status_code == 200:
            assert all(finite(v) for prediction in body["predictions"] for v in prediction.values())
        else:
            assert body.get("error"), body

    case()
    peak = peaks(stack)
    print(f"fuzz, through nginx: {sum(statuses.values())} cases, answers by status {statuses} in "
          f"{time.perf_counter() - started_all:.1f} s; peak memory of the serving stack {peak / 1e9:.2f} GB, "
          f"{(peak - before) / 1e9:.2f} GB over its start")
    assert 200 in statuses and 400 in statuses
    assert requests.get(served.ping_url, timeout=10).status_code == 200
    assert peak - before < GROWTH_GB * 1e9


def test_make_batch_answers_or_lists_every_mutated_file(seeds, demo_repo, tmp_path):
    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    cases = {}
    for n, (index, mutations) in enumerate(drawn(mutated_images(len(seeds)), BATCH_CASES)):
        name = f"case-{n:03d}.{seeds[index][0].lower()}"
        (folder / name).write_bytes(apply(seeds[index][1], mutations))
        cases[name] = (index, mutations)
    started = time.perf_counter()
    result, peak_gb = measured(["make", "-s", "-C", str(demo_repo), "batch", f"INPUT={folder}", f"OUTPUT={output}",
                                f"VENV={VENV}"], tmp_path / "peak.json")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skipped = {entry["file"]: entry["reason"] for entry in json.loads((output / "skipped.json").read_text())}
    answered = 0
    for name, case in cases.items():
        answer = output / f"{name}.json"
        assert answer.is_file() != (name in skipped), (name, case)  # answered or listed, never both, never neither
        if answer.is_file():
            answered += 1
            predictions = json.loads(answer.read_text())["predictions"]
            assert all(finite(v) for prediction in predictions for v in prediction.values()), (name, case)
        else:
            assert skipped[name].strip(), (name, case)
    print(f"fuzz, make batch: {len(cases)} files, {answered} answered, {len(skipped)} listed in skipped.json, "
          f"in {seconds:.1f} s; peak memory of its processes {peak_gb:.2f} GB")
    assert answered and skipped
    assert seconds < 120 + ANSWER_S * len(cases)
    assert peak_gb < PEAK_GB


XML_FIELDS = ("width", "height", "depth", "xmin", "ymin", "xmax", "ymax", "difficult", "truncated")
XML_VALUES = ("nan", "inf", "-inf", "1e999", "abc", "0x10", "", "-1", "0", "1", "12.5", "1e308",
              "99999999999999999999", " 7 ", "\u0663", "1_000")
# docs/dataset.md, 'Numbers in the XML': the values each field read must refuse (skipping the row and
# naming the field and the value). Not listed: accepted, or not said (' 7 ', '1_000'): written or named.
NOT_NUMBERS = {"nan", "inf", "-inf", "1e999", "abc", "0x10"}
REFUSED = {"width": NOT_NUMBERS | {"", "-1", "0", "12.5"}, "height": NOT_NUMBERS | {"", "-1", "0", "12.5"},
           "depth": set(),  # not read
           **{k: NOT_NUMBERS | {""} for k in ("xmin", "ymin", "xmax", "ymax")},
           **{k: NOT_NUMBERS | {"-1", "12.5", "1e308", "99999999999999999999"} for k in ("difficult", "truncated")}}


def mutated_xmls():
    return st.one_of(
        st.tuples(st.just("value"), st.sampled_from(XML_FIELDS), st.sampled_from(XML_VALUES)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just("")),
        st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
        st.tuples(st.just("objects"), st.integers(2, 3000), st.just("")),
    )


def mutate_xml(data: bytes, mutation) -> bytes:
    kind, where, value = mutation
    if kind == "value":
        text = data.decode()
        start = text.index(f"<{where}>") + len(f"<{where}>")
        return (text[:start] + value + text[text.index(f"</{where}>", start):]).encode()
    if kind == "truncate":  # cut inside the root element: never well-formed
        return data[:where % data.index(b"</annotation>")]
    if kind == "flip":
        where %= len(data)
        return data[:where] + bytes([data[where] ^ value]) + data[where + 1:]
    start, end = data.index(b"<object>"), data.index(b"</object>") + len(b"</object>")
    return data[:start] + data[start:end] * where + data[end:]


def test_the_tfrecord_stage_names_every_mutated_annotation_and_writes_only_finite_numbers(sample_raw, tmp_path):
    import tensorflow as tf

    from detkit.data.annotations import list_pets
    from detkit.data.pipeline import shard_files
    from detkit.data.records import feature_spec

    stems = sorted({stem for stem, _ in list_pets(sample_raw)[0]}  # the rows the stage reads; an image that
                   - set(QUIRKS["truncated"] + QUIRKS["corrupt"]) - set(QUIRKS["no_xml"]))  # fails decodes first
    cases = drawn(mutated_xmls(), XML_CASES)
    rounds = [cases[at:at + len(stems)] for at in range(0, len(cases), len(stems))]  # one mutation an XML a run
    started, peak_gb = time.perf_counter(), 0.0
    for number, mutations in enumerate(rounds):
        raw, out = tmp_path / f"raw-{number}", tmp_path / f"records-{number}"
        shutil.copytree(sample_raw, raw)
        mutated = dict(zip(stems, mutations))
        for stem, mutation in mutated.items():
            path = raw / "annotations" / "xmls" / f"{stem}.xml"
            path.write_bytes(mutate_xml(path.read_bytes(), mutation))
        result, peak = measured([sys.executable, "-m", "stages.tfrecord", "--raw", str(raw), "--out", str(out),
                                 "dataset=sample"], tmp_path / "peak.json")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        peak_gb = max(peak_gb, peak)
        stats = json.loads((out / "stats.json").read_text())
        written = set()
        for split in ("train", "val"):
            for serialized in tf.data.TFRecordDataset(shard_files(out, split)):
                example = tf.io.parse_single_example(serialized, feature_spec())
                for key, value in example.items():
                    value = tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value
                    if value.dtype in (tf.float32, tf.float64):
                        assert finite(value.numpy()), key
                written.add(Path(example["image/filename"].numpy().decode()).stem)
        skipped = {Path(entry["file"]).stem: entry for entry in stats["skipped"]}
        repaired = {Path(entry["file"]).stem for entry in stats["repaired"]}
        for stem, mutation in mutated.items():
            assert (stem in written) != (stem in skipped), (stem, mutation)  # written or skipped, never both
            kind, field, value = mutation
            if kind == "value" and value in REFUSED[field]:
                entry = skipped.get(stem, {})
                assert entry.get("field", "").split("/")[-1] == field and entry.get("value") == value, (stem, mutation,
                                                                                                        entry)
            elif kind == "truncate":
                assert skipped.get(stem, {}).get("reason", "").startswith("invalid annotation"), (stem, mutation)
        print(f"fuzz, tfrecord stage run {number + 1}: {len(mutated)} XMLs mutated, {len(written & set(mutated))} "
              f"written ({len(repaired & set(mutated))} with a repair), {len(set(skipped) & set(mutated))} skipped")
    print(f"fuzz, tfrecord stage: {len(cases)} cases in {time.perf_counter() - started:.1f} s; peak memory of "
          f"its processes {peak_gb:.2f} GB")
    assert peak_gb < PEAK_GB
