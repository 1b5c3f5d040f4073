"""The train input pipeline's images/s per CPU core at each real model file's input size.

``detkit.data.pipeline.train_dataset`` (parse, decode, resize, augment, batch, the family's targets) on
records of ``benchmarks.pets_like`` archives (JPEGs of the real images' size, 300-500 px and about
100 KB; the embedded sample's are thumbnails of 5 KB), once limited to one thread (one core) and once
with every core; the baseline is the one-thread run in the same process. A GPU host keeps one GPU fed
only if the pipeline delivers its images: RetinaNet ResNet-50 trains at about 200-240 images/s on one
H200, which a 16-core host feeds at 800 px only at 16 images/s per core or more (the goal printed).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks import pets_like
from benchmarks.rehearsal import default_run_copy, edit_dataset_file
from detkit.config import load_config
from harness.repo_copy import stage_command

MODELS = ("retinanet_resnet50", "dfine_small", "faster_rcnn_resnet101")
GOAL_PER_CORE = 16.0  # images/s per core at 800 px: 200-240 images/s over a 16-core GPU host
BATCHES = 20


def pets_like_copy(work: Path) -> Path:
    """A copy of the repository (committed config) whose dataset file names Pets-like archives (3 images a
    breed), with its ``data/raw`` and ``data/records`` as the download and tfrecord stages write them."""
    root = default_run_copy(work / "repo")
    edit_dataset_file(root, pets_like.write_archives(work / "archives", per_breed=2, test_per_breed=1))
    stage_command("download", "--out", "data/raw", "--cache", "data/downloads", root=root)
    stage_command("tfrecord", "--raw", "data/raw", "--out", "data/records", root=root)
    return root


def images_per_second(records: Path, cfg, one_thread: bool) -> float:
    import tensorflow as tf

    from detkit.data import pipeline
    from detkit.models import family

    t, size = cfg.train, int(cfg.model.image_size)
    dataset = pipeline.train_dataset(records, size, int(t.batch_size), t.augment, max_boxes=int(t.max_boxes),
                                     shuffle_buffer=int(t.shuffle_buffer), seed=0, deterministic=bool(t.deterministic),
                                     targets=family.family(cfg.model.family).training_targets)
    if one_thread:
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
        dataset = dataset.with_options(options)
    batches = iter(dataset)
    next(batches)  # tracing and the shuffle buffer's first fill are start-up, not throughput
    start = time.perf_counter()
    for _ in range(BATCHES):
        next(batches)
    return BATCHES * int(t.batch_size) / (time.perf_counter() - start)


def main() -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="input-per-core-") as scratch:
        records = pets_like_copy(Path(scratch).resolve()) / "data" / "records"
        for model in MODELS:
            cfg = load_config(overrides=[f"model={model}"])
            size = int(cfg.model.image_size)
            one, every = (images_per_second(records, cfg, one_thread) for one_thread in (True, False))
            verdict = "meets" if one >= GOAL_PER_CORE else "is BELOW"
            print(f"input pipeline, {model} ({size} px, batch of train.batch_size): {one:.1f} images/s on one core "
                  f"(the baseline), {every:.1f} on {cores} cores ({every / one:.2f}x, {every / cores:.1f} a core); "
                  f"one core {verdict} the {GOAL_PER_CORE:.0f} images/s a core a GPU host needs", flush=True)


if __name__ == "__main__":
    main()
