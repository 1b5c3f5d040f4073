"""A seeded, bounded fuzzer over everything that reads files from strangers: the sample's images in five
formats, truncated, with flipped bytes, altered header fields and inflated sizes and counts, through the
export's signature in-process, through nginx (`make serve`'s stack), through `make batch`; and the
sample's annotation XMLs, mutated the same way, through the tfrecord stage.

Every case must end in an answer: 200 or a 4xx JSON, a listed skip, a row named in ``stats.json``;
no 5xx, every number finite, within a time bound, and the processes' peak memory under a bound.

Hypothesis draws the cases, derandomized (the same cases on every run). `make test` runs the
``suite`` profile (well under a minute of cases); `make fuzz` runs the ``fuzz`` profile, many more
(``HYPOTHESIS_PROFILE=fuzz``)."""

from __future__ import annotations

import io
import json
import math
import os
import resource
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detkit.config import load_config
from detkit.core.fsio import newest_version
from harness.repo_copy import make
from harness.serving import descendants

pytestmark = pytest.mark.slow

COMMON = {"derandomize": True, "deadline": None, "database": None,
          "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
settings.register_profile("suite", max_examples=150, **COMMON)
settings.register_profile("fuzz", max_examples=2000, **COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "suite")
settings.load_profile(PROFILE)
BATCH_CASES = {"suite": 40, "fuzz": 400}[PROFILE]
XML_CASES = {"suite": 40, "fuzz": 400}[PROFILE]

ANSWER_S = 10.0  # the slowest answer allowed for one request of a few KB
PEAK_GB = 3.0  # the serving stack's processes together, and this test process
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")


def encodings(image: Image.Image) -> dict[str, bytes]:
    out = {}
    for kind in FORMATS:
        buffer = io.BytesIO()
        image.save(buffer, kind)
        out[kind] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def seeds(val_examples) -> list[bytes]:
    """Small images of every format, from the demo's val images: what the mutations start from."""
    pictures = [Image.open(io.BytesIO(example["encoded"])).convert("RGB").resize((48, 40))
                for example in val_examples[:2]]
    return [data for picture in pictures for data in encodings(picture).values()]


def inflate(data: bytes, where: int, value: int) -> bytes:
    """A 16- or 32-bit header field set to a large value: sizes, counts, lengths."""
    where = min(where, max(len(data) - 4, 0))
    return data[:where] + struct.pack(">I", value) + data[where + 4:]


def mutated_images(seeds_count: int):
    mutation = st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, 4000), st.just(0)),
        st.tuples(st.just("flip"), st.integers(0, 4000), st.integers(1, 255)),
        st.tuples(st.just("header"), st.integers(0, 40), st.integers(0, 255)),
        st.tuples(st.just("inflate"), st.integers(0, 40), st.integers(0x1000, 0xFFFFFFFF)),
    )
    return st.tuples(st.integers(0, seeds_count - 1), st.lists(mutation, min_size=1, max_size=4))


def apply(data: bytes, mutations) -> bytes:
    for kind, where, value in mutations:
        if kind == "truncate":
            data = data[:where % (len(data) + 1)]
        elif kind == "inflate":
            data = inflate(data, where, value)
        elif data:
            where %= len(data)
            data = data[:where] + bytes([data[where] ^ value if kind == "flip" else value]) + data[where + 1:]
    return data


def finite(value) -> bool:
    return all(math.isfinite(x) for x in np.asarray(value, dtype=float).ravel())


def peak_tree_bytes(pid: int) -> int:
    """The sum of the high-water resident sets of ``pid`` and its descendants."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    return total


@pytest.fixture(scope="module")
def signature(demo_repo):
    import tensorflow as tf

    return tf.saved_model.load(str(newest_version(demo_repo / "models" / "export" / "pet_object_detection"))
                               ).signatures["serving_default"]


def test_mutated_images_in_process_are_answered_or_refused(seeds, signature):
    import tensorflow as tf

    seen = {"answered": 0, "refused": 0}

    @given(mutated_images(len(seeds)))
    def case(drawn):
        index, mutations = drawn
        data = apply(seeds[index], mutations)
        started = time.perf_counter()
        try:
            outputs = signature(inputs=tf.constant([data]))
        except tf.errors.InvalidArgumentError:  # what TF Serving answers with a 400
            seen["refused"] += 1
        else:
            assert all(finite(v.numpy()) for v in outputs.values())
            seen["answered"] += 1
        assert time.perf_counter() - started < ANSWER_S

    case()
    print(f"fuzz, in-process: {seen}")
    assert seen["answered"] and seen["refused"]  # the cases reach both ends, not only one
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"fuzz, in-process: peak memory of this process {peak / 2**30:.2f} GB")
    assert peak < PEAK_GB * 2**30


def test_mutated_images_through_nginx_get_200_or_a_4xx_json(seeds, served):
    kinds = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "application/x-image",
             "BMP": "application/x-image"}
    content_types = [kinds[kind] for kind in FORMATS] * (len(seeds) // len(FORMATS))

    statuses: dict[int, int] = {}

    @given(mutated_images(len(seeds)))
    def case(drawn):
        index, mutations = drawn
        data = apply(seeds[index], mutations)
        started = time.perf_counter()
        answer = requests.post(served.invocations_url, data=data, timeout=ANSWER_S * 3,
                               headers={"Content-Type": content_types[index]})
        assert time.perf_counter() - started < ANSWER_S
        assert answer.status_code == 200 or 400 <= answer.status_code < 500, (answer.status_code, answer.text)
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        body = answer.json()
        if answer.status_code == 200:
            assert all(finite(v) for prediction in body["predictions"] for v in prediction.values())
        else:
            assert body.get("error"), body

    case()
    print(f"fuzz, through nginx: answers by status {statuses}")
    assert 200 in statuses and 400 in statuses
    assert requests.get(served.ping_url, timeout=10).status_code == 200
    peak = peak_tree_bytes(served.process.pid)
    print(f"fuzz, through nginx: peak memory of the serving stack {peak / 2**30:.2f} GB")
    assert peak < PEAK_GB * 2**30


@settings(max_examples=1)
@given(drawn_cases=st.lists(mutated_images(2 * len(FORMATS)), min_size=BATCH_CASES, max_size=BATCH_CASES))
def test_make_batch_answers_or_lists_every_mutated_file(drawn_cases, seeds, demo_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "in"
    folder.mkdir()
    names = []
    for n, (index, mutations) in enumerate(drawn_cases):
        names.append(f"case-{n:03d}.{FORMATS[index % len(FORMATS)].lower()}")
        (folder / names[-1]).write_bytes(apply(seeds[index], mutations))
    output = folder.parent / "out"
    started = time.perf_counter()
    result = make(demo_repo, "batch", f"INPUT={folder}", f"OUTPUT={output}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.perf_counter() - started < 120 + ANSWER_S * len(names)
    skipped = json.loads((output / "skipped.json").read_text())
    listed = {entry["file"] for entry in skipped}
    for name in names:
        answer = output / f"{name}.json"
        assert answer.is_file() or name in listed, name
        if answer.is_file():
            predictions = json.loads(answer.read_text())["predictions"]
            assert all(finite(v) for prediction in predictions for v in prediction.values())


XML_FIELDS = ("width", "height", "depth", "xmin", "ymin", "xmax", "ymax", "difficult", "truncated")
XML_VALUES = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e308", "99999999999999999999", "", "abc", "12.5",
                              "0x10", "1_000", " 7 ", "\u0663"])


@settings(max_examples=1)
@given(edits=st.lists(st.tuples(st.sampled_from(XML_FIELDS), XML_VALUES, st.integers(0, 10**6)),
                      min_size=XML_CASES, max_size=XML_CASES))
def test_the_tfrecord_stage_names_every_mutated_annotation_and_writes_only_finite_numbers(
        edits, sample_raw, tmp_path_factory):
    import tensorflow as tf

    from detkit.data.annotations import list_pets
    from detkit.data.pipeline import shard_files
    from detkit.data.records import feature_spec
    from stages import tfrecord

    raw = tmp_path_factory.mktemp("fuzz-xml") / "raw"
    shutil.copytree(sample_raw, raw)
    trainval = {stem for stem, _ in list_pets(raw)[0]}  # the rows the stage reads
    xmls = sorted(path for path in (raw / "annotations" / "xmls").glob("*.xml") if path.stem in trainval)
    touched = set()
    for field, value, pick in edits:
        path = xmls[pick % len(xmls)]
        text = path.read_text()
        start = text.find(f"<{field}>")
        if start < 0:
            continue
        end = text.index(f"</{field}>", start)
        path.write_text(text[:start] + f"<{field}>{value}" + text[end:])
        touched.add(path.stem)
    out = raw.parent / "records"
    tfrecord.run(load_config(overrides=["dataset=sample"]), {"raw": raw}, {"records": out})
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
    named = {Path(entry["file"]).stem for kind in ("skipped", "repaired") for entry in stats[kind]}
    assert touched <= written | named
