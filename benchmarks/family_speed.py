"""Each real model file's training seconds per step at the default batch and its export's latency per image.

For every committed model file that starts from a preset (``pretrained`` is not ``none``: the real
configurations, e.g. ``retinanet_resnet50``, ``dfine_small``, ``faster_rcnn_resnet101``), in a copy of the
repository with the committed config and ``benchmarks.pets_like`` records (real per-image size):

1. the pretrained stage on the random-weight stand-in of the file's preset (``benchmarks.standin_preset``:
   the preset's exact architecture, so the same work per step as the real weights);
2. the train stage at the model file's input size and ``params.yaml``'s ``train.batch_size``, ``--steps``
   steps, under ``benchmarks.peak_rss``: seconds per step after the first (the first traces the graph)
   and the stage's peak memory;
3. the export stage, then the export's ``serving_default`` signature called in this process with one
   Pets-sized val JPEG (which it resizes to the model's size): median latency over ``--runs`` calls
   after a first, tracing call.

There is no in-run baseline to divide by: these are the figures a user compares detectors with on the
same machine; the printed RetinaNet line is the reference for the others (the ratio column). CPU
figures: a GPU host is another matter (docs/models.md).

    python -m benchmarks.family_speed [--models dfine_small ...] [--steps 3] [--runs 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.input_per_core import pets_like_copy
from benchmarks.rehearsal import (
    failure,
    measured,
    model_preset,
    own_lines,
    seconds_per_step,
    val_image,
)
from harness.repo_copy import REPO_ROOT, activated_env, run, stage_command

LIMIT_GB = 20.0  # the machine has 24 GB: a stage above this is killed and reported, not left to swap


def real_models(repo: Path) -> list[str]:
    """The model files of ``repo`` that start from a preset, the reference (params.yaml's model) first."""
    default = str(OmegaConf.load(repo / "params.yaml").model)
    files = sorted(p.stem for p in (repo / "conf" / "model").glob("*.yaml"))
    real = [name for name in files if model_preset(repo, name) is not None]
    return sorted(real, key=lambda name: name != default)


def measure(repo: Path, work: Path, model: str, steps: int, runs: int, image: bytes) -> dict:
    preset = model_preset(repo, model)
    out = work / model
    logs = out / "logs"
    logs.mkdir(parents=True)
    run([sys.executable, "-m", "benchmarks.standin_preset", "--preset", preset, "--out", str(out / "preset")],
        REPO_ROOT)
    standin = json.loads((out / "preset" / "info.json").read_text())
    picked = [f"model={model}", f"model.pretrained='{Path(standin['archive']).resolve().as_uri()}'",
              f"model.pretrained_sha256='{standin['sha256']}'"]
    stage_command("pretrained", "--out", str(out / "pretrained"), "--cache", str(out / "cache"), *picked, root=repo)
    train = measured([sys.executable, "-m", "stages.train", "--records", "data/records",
                      "--pretrained", str(out / "pretrained"), "--checkpoints", str(out / "checkpoints"),
                      "--log", str(out / "train_log.csv"), "--val-log", str(out / "val_log.csv"), *picked,
                      f"train.steps={steps}", f"train.warmup_steps={steps - 1}", f"train.checkpoint_every={steps}"],
                     repo, activated_env(), logs, "train", LIMIT_GB)
    if train["returncode"]:  # a stage peak_rss killed has exited with -9 too
        raise RuntimeError(failure(f"{model}'s train stage", train))
    steady, overall = seconds_per_step(train["stderr"], own_lines("train", train["stdout"]))
    stage_command("export", "--checkpoints", str(out / "checkpoints"), "--records", "data/records",
                  "--out", str(out / "export"), *picked, "export.check_images=2", root=repo)
    return {"model": model, "steady_s": steady, "overall_s": overall, "train_gb": train["max_rss_gb"],
            "latency_s": latency(next((out / "export").glob("*/*/saved_model.pb")).parent, image, runs)}


def latency(export: Path, image: bytes, runs: int) -> float:
    import tensorflow as tf

    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    inputs = tf.constant([image])
    serve(inputs=inputs)  # the first call traces and allocates
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        serve(inputs=inputs)["num_detections"].numpy()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model files (default: every one that starts from a preset)")
    parser.add_argument("--steps", type=int, default=3, help="train steps per model (the first is not timed)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls of each export")
    parser.add_argument("--work", type=Path, help="keep the copy, stand-ins and logs here (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="family-speed-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        repo = pets_like_copy(work)
        params = OmegaConf.load(repo / "params.yaml")
        _, image = val_image(repo)
        rows = []
        for model in args.models or real_models(repo):
            size = int(OmegaConf.load(repo / "conf" / "model" / f"{model}.yaml").image_size)
            row = measure(repo, work, model, args.steps, args.runs, image)
            rows.append(row)
            print(describe(row, rows[0], size, int(params.train.batch_size)), flush=True)


def describe(row: dict, reference: dict, size: int, batch: int) -> str:
    def versus(key: str) -> str:
        return "" if row is reference else f", {row[key] / reference[key]:.2f}x {reference['model']}'s"

    return (f"{row['model']} ({size} px): train {row['steady_s']:.1f} s/step at batch {batch} "
            f"({batch / row['steady_s']:.2f} images/s{versus('steady_s')}; {row['overall_s']:.1f} s/step with the "
            f"first step's tracing), train stage peak {row['train_gb']:.2f} GB; export "
            f"{row['latency_s'] * 1000:.0f} ms per image at batch 1{versus('latency_s')}")


if __name__ == "__main__":
    main()
