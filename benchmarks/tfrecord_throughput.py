"""TFRecord throughput on full-size images: the stage's process pool vs one process.

Builds a Pets-layout set of at least 2,000 full-size JPEGs (500 px class, like the real
archive) by upscaling the embedded sample, then times ``stages.tfrecord.run`` with one
worker (the baseline: same work, one file at a time) and with all cores.
Goal (issue 2): at least 1.8x the baseline on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import tempfile
from pathlib import Path

import numpy as np
from lxml import etree
from PIL import Image

from detkit.data.annotations import list_pets
from detkit.data.examples import default_workers
from harness.repo_copy import stage_command

GOAL = 1.8


def build_full_size_set(sample_raw: Path, out: Path, per_class: int) -> int:
    """``per_class`` images of each sample breed, upscaled to 400-500 x 300-500 px."""
    rows, _, _ = list_pets(sample_raw)
    annotated = [(s, b) for s, b in rows if (sample_raw / "annotations" / "xmls" / f"{s}.xml").is_file()
                 and (sample_raw / "images" / f"{s}.jpg").read_bytes()[:2] == b"\xff\xd8"]
    by_breed: dict[str, list[str]] = {}
    for stem, breed in annotated:
        by_breed.setdefault(breed, []).append(stem)
    (out / "images").mkdir(parents=True)
    (out / "annotations" / "xmls").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for class_id, breed in enumerate(sorted(by_breed, key=str.lower), start=1):
        for k in range(per_class):
            source = by_breed[breed][k % len(by_breed[breed])]
            try:
                picture = Image.open(sample_raw / "images" / f"{source}.jpg").convert("RGB")
            except OSError:
                continue
            size = (int(rng.integers(400, 501)), int(rng.integers(300, 501)))
            scale = (size[0] / picture.width, size[1] / picture.height)
            big = np.asarray(picture.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
            big = np.clip(big + rng.integers(-6, 7, big.shape), 0, 255).astype(np.uint8)
            stem = f"{breed}_{k + 1}"
            buffer = io.BytesIO()
            Image.fromarray(big).save(buffer, "JPEG", quality=92)
            (out / "images" / f"{stem}.jpg").write_bytes(buffer.getvalue())
            xml = etree.parse(str(sample_raw / "annotations" / "xmls" / f"{source}.xml"))
            xml.find("filename").text = f"{stem}.jpg"
            xml.find("size/width").text, xml.find("size/height").text = str(size[0]), str(size[1])
            for key, factor in (("xmin", scale[0]), ("xmax", scale[0]), ("ymin", scale[1]), ("ymax", scale[1])):
                node = xml.find(f"object/bndbox/{key}")
                node.text = str(round(float(node.text) * factor))
            xml.write(str(out / "annotations" / "xmls" / f"{stem}.xml"))
            lines.append(f"{stem} {class_id} {1 if breed[0].isupper() else 2} 1\n")
    (out / "annotations" / "trainval.txt").write_text("".join(lines))
    (out / "annotations" / "test.txt").write_text("")
    return len(lines)


def timed_run(raw: Path, out: Path, workers: int) -> tuple[float, int]:
    """The stage as `dvc repro` runs it, in its own process; its own figure (listing, pool
    start, writing, stats.json) leaves out the interpreter's start and imports, the same
    for both variants."""
    result = stage_command("tfrecord", "--raw", str(raw), "--out", str(out), "--workers", str(workers))
    count, seconds = re.search(r"tfrecord: (\d+) examples in ([\d.]+) s", result.stdout).groups()
    return float(seconds), int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=55, help="images per breed (37 breeds)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best of each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stage_command("download", "--cache", str(tmp / "cache"), "--out", str(tmp / "sample"), "dataset=sample")
        count = build_full_size_set(tmp / "sample", tmp / "raw", args.per_class)
        megabytes = sum(p.stat().st_size for p in (tmp / "raw" / "images").iterdir()) / 1e6
        print(f"bench set: {count} JPEGs, 400-500 x 300-500 px, {megabytes:.0f} MB")
        workers = default_workers()
        # Interleaved rounds, best of each: a shared VM's noise (steal, other tenants) only
        # ever slows a run down, so the fastest round is the closest to the code's own cost.
        base_s = pool_s = float("inf")
        round_ratios = []
        for round_ in range(args.rounds):
            one, n = timed_run(tmp / "raw", tmp / f"one{round_}", workers=1)
            pool, m = timed_run(tmp / "raw", tmp / f"pool{round_}", workers=workers)
            assert n == m
            print(f"  round {round_ + 1}: baseline {one:.2f} s, stage {pool:.2f} s ({one / pool:.2f}x)")
            base_s, pool_s = min(base_s, one), min(pool_s, pool)
            round_ratios.append(one / pool)
        same = all((tmp / "one0" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "pool0").iterdir())
    ratio = base_s / pool_s
    print(f"tfrecord baseline (1 process, one file at a time): {n / base_s:8.1f} images/s  ({base_s:.2f} s, best)")
    print(f"tfrecord stage ({workers} worker processes):       {m / pool_s:8.1f} images/s  ({pool_s:.2f} s, best)")
    print(f"tfrecord speed-up: {ratio:.2f}x (goal >= {GOAL}x on 2 cores: {'met' if ratio >= GOAL else 'NOT met'}); "
          f"median of the rounds' own ratios {statistics.median(round_ratios):.2f}x; outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
