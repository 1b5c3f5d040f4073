"""Serving memory and the slowest answer: the peak resident memory of the model server's process tree
(serving/entrypoint.sh,
nginx and the TF Serving stand-in, as `make serve` runs them) while 8 clients send images at the
export's ``export.max_image_pixels`` limit, against the same 8 clients sending ordinary val-sized
images, in the same run; and between the two, 3 images over the limit from each client (a 1 MB
PNG declaring 4x the limit's side, 1.1 GB decoded), which the serving graph refuses from their
header: they cost what as many refused non-image requests of the same size cost, far less than
one decoded image. Then the worst inputs found, 8 clients for the same time: GIF bombs (a frame
far past its 10 x 10 screen, and frames that together exceed the limit) and JPEGs of 2000 empty
scans, all refused before decoding; each phase prints its slowest answer too.

Goals: at the limit, the tree stays within 8 decoded images (3 bytes a pixel each) of the
baseline's peak; the over-limit requests add less than one of them decoded.

    python -m benchmarks.serving_memory [--export models/export/pet_object_detection] [--seconds 20]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from benchmarks.batch_inference import standin_export
from benchmarks.peak_rss import rss_bytes
from benchmarks.serving_latency import jpeg
from detkit.config import load_config
from detkit.core.fsio import EXPORT_CHECK, newest_version
from detkit.serve.predict import request_body

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLIENTS = 8
BYTES_PER_PIXEL = 3  # a decoded uint8 RGB image
OVER_LIMIT_EACH = 3  # refused requests per client: the stand-in keeps a few MB of each refused 1 MB request


class TreeSampler:
    """The largest sum of resident sets of a process and its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        from harness.serving import descendants

        self.pid, self.interval, self.descendants = pid, interval, descendants
        self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def now(self) -> int:
        return sum(rss_bytes(pid) for pid in [self.pid, *self.descendants(self.pid)])

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def reset(self) -> int:
        """Start a new phase from the current size; returns it."""
        self.peak = self.now()
        return self.peak

    def __enter__(self) -> TreeSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()


def hammer(url: str, body: str, seconds: float, each: int | None = None, clients: int = CLIENTS) -> Counter:
    """``clients`` threads posting ``body`` for ``seconds`` (or ``each`` times): how many answers
    of each status class, and under "slowest s" the longest one took."""
    import requests

    counts: Counter = Counter()
    slowest = [0.0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        mine: Counter = Counter()
        with requests.Session() as session:
            while time.monotonic() < deadline and (each is None or sum(mine.values()) < each):
                started = time.monotonic()
                try:
                    status = session.post(url, data=body, headers={"content-type": "application/json"},
                                          timeout=120).status_code
                    mine[f"{status // 100}xx" if status != 200 else "200"] += 1
                except requests.RequestException:
                    mine["no answer"] += 1
                slowest[0] = max(slowest[0], time.monotonic() - started)
        with lock:
            counts.update(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts["slowest s"] = round(slowest[0], 2)
    return counts


def flat_jpeg(width: int, height: int, **options) -> bytes:
    """One colour: a few hundred KB on the wire however many pixels it decodes to."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def export_limit(version: Path) -> int:
    """The limit the served graph enforces: the export's, not today's params.yaml."""
    check = json.loads((version / EXPORT_CHECK).read_text())
    if "max_image_pixels" not in check:
        raise SystemExit(f"{version}: exported before export.max_image_pixels (its graph decodes any size); "
                         "export again")
    return int(check["max_image_pixels"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="export folder <base>/<model_name> (default: the tiny model "
                                                    "with random weights, exported here: the demo's graph)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load per phase")
    args = parser.parse_args()
    if args.export is not None:
        measure(args.export, export_limit(newest_version(args.export)), args.seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        measure(standin_export(Path(tmp)), load_config().export.max_image_pixels, args.seconds)


def measure(export: Path, limit: int, seconds: float) -> None:
    from harness.images import gif_of_frames, jpeg_with_scans, png_declaring
    from harness.serving import ServingStack

    version = newest_version(export)
    side = math.isqrt(limit)
    ordinary, at_limit = jpeg((500, 375)), flat_jpeg(side, limit // side)
    over = png_declaring(4 * side, 4 * side, rows=None)  # complete and valid: a decoder would fill it
    decoded = {"at": limit * BYTES_PER_PIXEL, "over": (4 * side) ** 2 * BYTES_PER_PIXEL}
    mb = 1 / 2**20
    print(f"model: {version}, export.max_image_pixels = {limit}; {CLIENTS} clients, {seconds:g} s a phase")
    print(f"images: val-sized 500 x 375 JPEG ({len(ordinary) // 1024} KB); at the limit {side} x {limit // side} "
          f"JPEG ({len(at_limit) // 1024} KB, {decoded['at'] * mb:.0f} MB decoded); over it {4 * side} x {4 * side} "
          f"PNG ({len(over) // 1024} KB, {decoded['over'] * mb:.0f} MB decoded, were it decoded)")

    hostile = {
        "GIF frame past screen": gif_of_frames((10, 10), [(0, 0, 10, 10), (0, 0, 6000, 6000)]),
        "GIF frames together": gif_of_frames((3000, 3000), [(0, 0, 3000, 3000)] * 8),
        "JPEG of 2010 scans": jpeg_with_scans(flat_jpeg(2000, 1500, progressive=True, subsampling=0), 2000),
    }
    no_image = b"x" + over[1:]  # as large, but no image format: refused by its signature, never decoded
    with ServingStack(export.parent, model_name=export.name) as stack, \
            TreeSampler(stack.process.pid) as tree:
        hammer(stack.invocations_url, request_body([ordinary]), 2.0)  # warm: first calls trace and allocate
        peaks, growth = {}, {}
        # Smallest first: resident memory seldom shrinks, so each phase's peak is its own only in this order.
        for name, image, each in (("val-sized", ordinary, None), ("no image", no_image, OVER_LIMIT_EACH),
                                  ("over the limit", over, OVER_LIMIT_EACH),
                                  *((name, image, None) for name, image in hostile.items()),
                                  ("at the limit", at_limit, None)):
            start = tree.reset()
            counts = hammer(stack.invocations_url, request_body([image]), seconds, each)
            peaks[name], growth[name] = tree.peak, tree.peak - start
            print(f"  {name:<22} peak {tree.peak * mb:7.0f} MB (+{growth[name] * mb:.0f} MB in the phase); "
                  f"answers: {dict(sorted(counts.items()))}")

    baseline, at_limit_growth = peaks["val-sized"], peaks["at the limit"] - peaks["val-sized"]
    allowed = CLIENTS * decoded["at"]
    print(f"at the limit vs val-sized: {peaks['at the limit'] / baseline:.2f}x peak resident memory "
          f"(+{at_limit_growth * mb:.0f} MB; goal <= {CLIENTS} decoded images, +{allowed * mb:.0f} MB: "
          f"{'met' if at_limit_growth <= allowed else 'NOT met'})")
    print(f"over the limit: refused before decoding, +{growth['over the limit'] * mb:.0f} MB for "
          f"{CLIENTS * OVER_LIMIT_EACH} requests, as for the same bytes that are no image "
          f"(+{growth['no image'] * mb:.0f} MB: what refused requests of this size cost the stand-in); "
          f"goal < one decoded, {decoded['over'] * mb:.0f} MB: "
          f"{'met' if growth['over the limit'] < decoded['over'] else 'NOT met'}")

if __name__ == "__main__":
    main()
