"""`make demo` wall time, and the train input pipeline's speed next to the train step's.

1. Runs `make demo` (download -> ... -> eval on the embedded sample) in a fresh copy of
   the repository and prints its wall time and the AP50 it reached. Goal: under 5 minutes
   on 2 CPU cores.
2. On the demo's records and model: images/s that ``detkit.data.pipeline.train_dataset`` delivers
   (parse, decode, resize, augment, batch) against images/s of the compiled model's train
   step fed from memory. Goal: input at least 3x the step, so training is never input-bound.
3. On the demo's export: ``benchmarks.serving_latency`` (HTTP vs in-process, ResNet-50 graph).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchmarks import serving_latency
from detkit.config import load_config
from harness.repo_copy import make, make_repo_copy

GOAL_DEMO_S = 300
GOAL_INPUT_RATIO = 3.0
DEMO_MODEL_NAME = load_config().export.model_name


def time_demo(root: Path) -> float:
    start = time.perf_counter()
    result = make(root, "demo")
    if result.returncode != 0:
        raise SystemExit(f"make demo failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def input_vs_step(root: Path, batches: int = 30) -> tuple[float, float]:
    from detkit.core import tflog
    from detkit.data import pipeline as data
    from detkit.models import family
    from detkit.train.optimizer import make_optimizer, make_schedule

    # The copy's params and paths: DVC_ROOT is how the stages find the repo.
    with mock.patch.dict(os.environ, DVC_ROOT=str(root)):
        cfg = load_config()
        t, records = cfg.train, root / "data" / "records"
        label_map = family.load_label_map(records)
        fam = family.family(cfg.model.family)
        detector = family.build(cfg.model, len(label_map), None).model
        fam.compile(detector, make_optimizer(t, make_schedule(t)), t, "auto")
        size = int(cfg.model.image_size)
        dataset = data.train_dataset(records, size, int(t.batch_size), t.augment, max_boxes=int(t.max_boxes),
                                     shuffle_buffer=int(t.shuffle_buffer), seed=0, deterministic=bool(t.deterministic),
                                     targets=fam.training_targets)
        iterator = iter(dataset)
        next(iterator)  # tracing and the shuffle buffer's first fill are start-up, not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        input_rate = batches * int(t.batch_size) / (time.perf_counter() - start)

        in_memory = dataset.take(1).cache().repeat()
        tflog.log_onednn_notice()  # as the train stage does: the notice would come at the first step
        detector.fit(in_memory, epochs=1, steps_per_epoch=3, shuffle=False, verbose=0)  # compile the step
        start = time.perf_counter()
        detector.fit(in_memory, epochs=1, steps_per_epoch=batches, shuffle=False, verbose=0)
        step_rate = batches * int(t.batch_size) / (time.perf_counter() - start)
        return input_rate, step_rate


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_repo_copy(Path(tmp))
        seconds = time_demo(root)
        metrics = json.loads((root / "metrics" / "eval.json").read_text())
        verdict = "met" if seconds < GOAL_DEMO_S else "NOT met"
        print(f"make demo: {seconds:.0f} s wall (goal < {GOAL_DEMO_S} s: {verdict}); "
              f"val AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f} after {metrics['step']} steps")
        input_rate, step_rate = input_vs_step(root)
        ratio = input_rate / step_rate
        print(f"train input pipeline: {input_rate:8.1f} images/s")
        print(f"train step (from memory): {step_rate:8.1f} images/s")
        verdict = "met" if ratio >= GOAL_INPUT_RATIO else "NOT met"
        print(f"input / step: {ratio:.1f}x (goal >= {GOAL_INPUT_RATIO}x: {verdict})")
        # The demo's export is the model `make serve` serves: benchmark serving on it too.
        export = root / "models" / "export" / DEMO_MODEL_NAME
        serving_latency.serving_comparison(export, serving_latency.jpeg((500, 375)), seconds=10)
    serving_latency.resnet50_latency(runs=5)


if __name__ == "__main__":
    main()
