"""Serving latency and throughput: the exported model over HTTP (nginx /invocations in front
of the TF Serving stand-in, as `make serve` runs them, with request batching and without)
against the same SavedModel called in-process, at 1 and 8 concurrent clients, in the same
run; then the exported retinanet_resnet50 graph's CPU latency on one 640x640 image (random
weights).

Goals (issue 4): HTTP overhead over in-process under 10 ms at p50 for one client; 8 clients
give at least 1.5x the throughput of one; retinanet_resnet50 under 3 s per image.

    python -m benchmarks.serving_latency [--export models/export/pet_object_detection] [--seconds 10]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from detkit.config import load_config
from detkit.core.fsio import newest_version
from detkit.serve.predict import request_body

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

OVERHEAD_GOAL_MS = 10.0
SCALING_GOAL = 1.5
RESNET_GOAL_S = 3.0


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth colour fields plus noise (pure noise would make a huge file)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 32 + 1, size[0] // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    pixels = np.clip(np.asarray(image, np.int16) + rng.integers(-10, 11, (size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def load(call: Callable[[], None], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads calling ``call`` for ``seconds``: latency percentiles and throughput."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        mine = []
        while time.monotonic() < deadline:
            started = time.perf_counter()
            call()
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    ms = np.array(latencies) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "rps": len(ms) / elapsed,
            "n": len(ms)}


def poster(url: str, body: str) -> Callable[[], None]:
    """POST ``body`` to ``url``, one keep-alive session per client thread."""
    import requests

    sessions = threading.local()

    def post() -> None:
        if not hasattr(sessions, "s"):
            sessions.s = requests.Session()
        response = sessions.s.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

    return post


def serving_comparison(export: Path, image: bytes, seconds: float) -> None:
    import tensorflow as tf

    from harness.serving import ServingStack

    version = newest_version(export)
    print(f"model: {version} (the export that `make serve` serves); request: one {len(image) // 1024} KB JPEG, "
          f"the REST request body of docs/export.md")
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    batch = tf.constant([image])

    def in_process() -> None:
        serve(inputs=batch)["num_detections"].numpy()

    body = request_body([image])
    results = {}

    def measure(name: str, call: Callable[[], None]) -> None:
        for _ in range(5):
            call()  # warm: first calls trace and allocate
        for clients in (1, 8):
            results[name, clients] = r = load(call, clients, seconds)
            print(f"  {name:<30} {clients} client{'s' if clients > 1 else ' '}: p50 {r['p50']:7.1f} ms  "
                  f"p99 {r['p99']:7.1f} ms  {r['rps']:7.1f} requests/s  ({r['n']} requests)")

    measure("in-process", in_process)
    # As `make serve` runs it (request batching on), then with batching off for comparison.
    for name, env in (("HTTP /invocations", {}), ("HTTP /invocations, no batching", {"TFS_ENABLE_BATCHING": "false"})):
        with ServingStack(export.parent, model_name=export.name, env=env) as stack:
            measure(name, poster(stack.invocations_url, body))
    overhead = results["HTTP /invocations", 1]["p50"] - results["in-process", 1]["p50"]
    scaling = {name: results[name, 8]["rps"] / results[name, 1]["rps"]
               for name in ("HTTP /invocations", "HTTP /invocations, no batching", "in-process")}
    print(f"HTTP overhead at p50, one client: {overhead:.1f} ms (goal < {OVERHEAD_GOAL_MS:g} ms: "
          f"{'met' if overhead < OVERHEAD_GOAL_MS else 'NOT met'})")
    print(f"8 clients vs 1 over HTTP: {scaling['HTTP /invocations']:.2f}x throughput (goal >= {SCALING_GOAL}x: "
          f"{'met' if scaling['HTTP /invocations'] >= SCALING_GOAL else 'NOT met'}); without batching "
          f"{scaling['HTTP /invocations, no batching']:.2f}x; the SavedModel in-process {scaling['in-process']:.2f}x")


def resnet50_latency(runs: int) -> None:
    """Export retinanet_resnet50 (640 px) built from the random-weight stand-in of its preset, as the
    pretrained stage hands it to training, and time its serving signature."""
    import tensorflow as tf

    from benchmarks import standin_preset
    from detkit.data.images import ImageLimits
    from detkit.models import retinanet as model
    from detkit.serve.signatures import write_savedmodel

    cfg = load_config(overrides=["model=retinanet_resnet50", "model.image_size=640"])
    preset = standin_preset.preset_name(cfg.model.pretrained)
    with tempfile.TemporaryDirectory() as folder:
        standin_preset.build(preset).save_to_preset(str(Path(folder) / preset))
        detector = model.FAMILY.build(cfg.model, 37, Path(folder)).model
    image = tf.constant([jpeg((640, 640), seed=1)])
    # With the class head's last kernel zeroed every anchor scores exactly the prior: 0.01 is below
    # the 0.05 threshold (NMS sees nothing, as with a trained model on a background image), 0.5 puts
    # all anchors above it (NMS's worst case). The stand-in's random features would otherwise spread
    # the scores of both.
    kernel = detector.classification_head.prediction_layer.kernel
    kernel.assign(np.zeros(kernel.shape, "float32"))
    for label, prior in (("trained-like prior 0.01", 0.01), ("every anchor above threshold", 0.5)):
        model.set_prior_bias(detector, prior)
        with tempfile.TemporaryDirectory() as tmp:
            write_savedmodel(model.FAMILY, detector, 640, cfg.model.detection, int(cfg.export.max_detections),
                             Path(tmp) / "1", ["serving_default"], ImageLimits.of(cfg.export))
            serve = tf.saved_model.load(str(Path(tmp) / "1")).signatures["serving_default"]
            serve(inputs=image)  # first call traces and allocates
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                count = int(serve(inputs=image)["num_detections"].numpy()[0])
                times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(f"retinanet_resnet50 export, 640x640, CPU, {label}: median {median:.2f} s over {runs} runs "
              f"({count} detections; goal < {RESNET_GOAL_S:g} s: {'met' if median < RESNET_GOAL_S else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cfg = load_config()
    parser.add_argument("--export", type=Path, default=Path("models/export") / cfg.export.model_name,
                        help="export folder <base>/<model_name> (default: the demo's)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per load level")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of the ResNet-50 graph")
    args = parser.parse_args()
    serving_comparison(args.export, jpeg((500, 375)), args.seconds)
    resnet50_latency(args.runs)


if __name__ == "__main__":
    main()
