"""The train stage's own cost: its steps/s next to a bare Keras ``fit`` of the same model on the
same dataset, in one process (goal: the stage at least 0.95x the bare fit).

The bare baseline is what the stage wraps: ``model.fit(dataset, steps_per_epoch=N, verbose=0)``
with Keras' defaults. The stage adds its loop (a stop every ``train.log_every`` steps: a log row,
progress, checkpoints, MLflow) on top. Both include the first step's graph tracing; the stage's
figure also its last checkpoint. Both run with op determinism on (the stage's default) after
an untimed warm-up fit, so neither pays the process's one-time start-up costs. Shown for the
default ``train.log_every`` and for 1 (a stop and a log row every step, as the stage
did before ``log_every``).

    python -m benchmarks.train_loop [--steps 150]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from detkit.config import load_config
from harness.repo_copy import stage_command

OVERRIDES = ["dataset=sample", "model=retinanet_tiny", "train.batch_size=8", "train.warmup_steps=10",
             "train.learning_rate=0.002"]
GOAL = 0.95


def prepare(root: Path) -> Path:
    stage_command("download", "--cache", str(root / "cache"), "--out", str(root / "raw"), "dataset=sample")
    stage_command("tfrecord", "--raw", str(root / "raw"), "--out", str(root / "records"), "dataset=sample")
    return root / "records"


def bare_fit(cfg, records: Path) -> float:
    """Seconds for ``cfg.train.steps`` steps of a plain ``fit`` on the stage's model and dataset."""
    import keras

    from detkit.data import pipeline as D
    from detkit.models import family
    from detkit.train.optimizer import make_optimizer, make_schedule

    t = cfg.train
    keras.utils.set_random_seed(int(t.seed))
    fam = family.family(cfg.model.family)
    detector = family.build(cfg.model, len(family.load_label_map(records)), None).model
    fam.compile(detector, make_optimizer(t, make_schedule(t)), t, "auto")
    dataset = D.train_dataset(records, int(cfg.model.image_size), int(t.batch_size), t.augment,
                              max_boxes=int(t.max_boxes), shuffle_buffer=int(t.shuffle_buffer), seed=int(t.seed),
                              deterministic=bool(t.deterministic), targets=fam.training_targets)
    start = time.perf_counter()
    detector.fit(dataset, epochs=1, steps_per_epoch=int(t.steps), shuffle=False, verbose=0)
    return time.perf_counter() - start


def stage(cfg, records: Path, out: Path) -> float:
    from detkit.train import loop

    summary = loop.train(cfg, {"records": records}, {"checkpoints": out / "checkpoints", "log": out / "log.csv",
                                                    "val_log": out / "val.csv"},
                        tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return float(summary["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="train-loop-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("DVC_ROOT", str(Path(__file__).resolve().parents[1]))
        records = prepare(root)
        base = [*OVERRIDES, f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}"]
        default = load_config(overrides=base)
        if default.train.deterministic:  # the stage turns op determinism on for the whole process
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        bare_fit(load_config(overrides=[*OVERRIDES, "train.steps=20"]), records)  # one-time process warm-up
        # The baseline before and after the stage runs, averaged: a busy machine drifts over minutes.
        first = bare_fit(default, records)
        rows = []
        for log_every in (int(default.train.log_every), 1):
            cfg = load_config(overrides=[*base, f"train.log_every={log_every}"])
            rows.append((f"train stage, train.log_every={log_every}", stage(cfg, records, root / f"every{log_every}")))
        second = bare_fit(default, records)
        bare = (first + second) / 2
        rows.insert(0, (f"bare Keras fit (baseline; {first:.1f} s, {second:.1f} s)", bare))
    print(f"\ntrain loop: {args.steps} steps of retinanet_tiny (128 px, batch 8) on the embedded sample")
    for name, seconds in rows:
        print(f"  {name:48s} {args.steps / seconds:6.2f} steps/s  ({seconds:.1f} s)  "
              f"{bare / seconds:.3f}x the bare fit")
    ratio = bare / rows[1][1]
    print(f"train loop: stage / bare fit = {ratio:.3f}x with the defaults (goal >= {GOAL}x): "
          f"{'met' if ratio >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
