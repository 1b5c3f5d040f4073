"""DVC stage ``train``: TFRecords (+ pretrained preset) -> trained detector, checkpoints, log, MLflow run.

Trains the detector of ``model.*`` (``detkit.model``) on the ``train`` records with
``train.*`` (optimizer, warmup + cosine/constant schedule, clipping, augmentation), with
Keras ``fit``. On a machine with GPUs it uses mixed precision (``mixed_float16``) and
``tf.distribute.MirroredStrategy`` over all of them (``train.batch_size`` is the global
batch); on CPU neither.

Outputs, in ``--checkpoints`` (a DVC ``persist: true`` output, so a re-run after a crash
resumes instead of restarting from step 0):

- ``ckpt-<step, 7 digits>/``: ``model.weights.h5`` (``save_weights`` of the compiled model:
  Keras 3 stores the optimizer's variables, ``iterations`` included, with the weights;
  restoring checks ``iterations`` against the step), ``state.json`` (step, params
  fingerprint) and ``train_log.csv`` (the log up to that step).
  Written every ``train.checkpoint_every`` steps and at the last step, each atomically; the
  newest ``train.keep_checkpoints`` are kept.
- ``checkpoint.json``: ``{"latest": "ckpt-...", "step": N, "fingerprint": ...}``, replaced
  atomically after the checkpoint folder is complete: the checkpoint a re-run resumes from.
  Checkpoints whose fingerprint (model + train params except checkpoint_every/keep_checkpoints,
  the train shards' bytes, the pretrained preset) differs from this run's are discarded.
- ``final/``: the trained model for eval and export (``detkit.model.save_trained``): a
  KerasHub preset folder (``RetinaNetObjectDetector.from_preset(final)`` or
  ``detkit.model.load_trained(final)``), ``detkit.json`` (name, image_size, num_classes,
  label_offset, detection settings, step, fingerprint, mlflow run id) and ``label_map.pbtxt``.
- ``mlflow_run.json``: ``{"run_id", "experiment_id", "experiment_name", "tracking_uri"}`` of
  the MLflow run, so eval logs into the same run.

``--log`` (for ``dvc plots``): CSV ``step,loss,box_loss,class_loss,learning_rate``, one row per
step, refreshed at each checkpoint: the losses of that step's batch (``loss`` is the optimised
total ``box_loss + train.class_loss_weight * class_loss``), ``learning_rate`` the rate that step used.

MLflow: tracking URI ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<repo root>/mlflow.db``, artifacts
next to the database in ``mlruns/``, experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``pets``. The
run gets every param (flattened, ``model.anchors.num_scales``), the per-step metrics (sent at
each checkpoint, so a resumed run logs no step twice), tags ``dvc_exp_name`` (``$DVC_EXP_NAME``)
and ``git_revision``, and ``final/`` as the artifact ``final``. A resumed run continues the same
MLflow run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detkit.cli import run_stage, stage_parser
from detkit.config import repo_root
from detkit.fsio import atomic_dir, atomic_write_bytes, atomic_write_json

LOG_FIELDS = ("step", "loss", "box_loss", "class_loss", "learning_rate")
CHECKPOINT_INDEX = "checkpoint.json"
RUN_FILE = "mlflow_run.json"
FINAL = "final"
# Params that change how often the run saves, not what it computes: not in the fingerprint.
NOT_FINGERPRINTED = ("checkpoint_every", "keep_checkpoints")


class TrainError(ValueError):
    """Training cannot start: names the input to fix."""


# ---------------------------------------------------------------------------- helpers


def _hash_files(paths: Iterable[Path], h: Any) -> None:
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def fingerprint(cfg, records: Path, pretrained: Path | None) -> str:
    """What decides the trained weights: model + train params, train shards, pretrained preset."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    for key in NOT_FINGERPRINTED:
        train.pop(key, None)
    h = hashlib.sha256(json.dumps({"model": OmegaConf.to_container(cfg.model, resolve=True), "train": train},
                                  sort_keys=True).encode())
    _hash_files(sorted(records.glob("train-*.tfrecord")) + [records / "label_map.pbtxt"], h)
    if cfg.model.builder == "preset" and pretrained is not None and pretrained.is_dir():
        _hash_files(sorted(p for p in pretrained.rglob("*") if p.is_file()), h)
    return h.hexdigest()[:16]


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` (lists by index), as MLflow params."""
    out: dict[str, str] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        return {prefix[:-1]: str(node)[:6000]}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def git_revision(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _log_csv(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), **{k: float(r[k]) for k in LOG_FIELDS[1:]}} for r in csv.DictReader(f)]


def _clear(checkpoints: Path) -> None:
    """Remove a previous run's checkpoints (other params or data), final model and run file."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        if path.name.startswith(("ckpt-", ".ckpt-")) or path.name in (FINAL, CHECKPOINT_INDEX, RUN_FILE):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---------------------------------------------------------------------------- optimizer


def make_schedule(t):
    """Linear warmup from 0 to ``learning_rate``, then cosine decay (or constant)."""
    import keras

    alpha = float(t.min_lr_fraction) if t.schedule == "cosine" else 1.0
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if t.warmup_steps else float(t.learning_rate),
        decay_steps=max(int(t.steps) - int(t.warmup_steps), 1),
        alpha=alpha,
        warmup_target=float(t.learning_rate) if t.warmup_steps else None,
        warmup_steps=int(t.warmup_steps),
    )


def make_optimizer(t, schedule):
    import keras

    clip = {"clipnorm": float(t.clipnorm)} if t.clipnorm is not None else {}
    if t.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=schedule, **clip)
    if t.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=float(t.weight_decay), **clip)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=float(t.momentum),
                                weight_decay=float(t.weight_decay) or None, **clip)


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(checkpoints: Path, detector, step: int, fp: str, rows: list[dict[str, Any]], keep: int) -> Path:
    name = f"ckpt-{step:07d}"
    with atomic_dir(checkpoints / name) as tmp:
        # Keras 3 saves a compiled model's optimizer variables (iterations included) with its weights.
        detector.save_weights(str(tmp / "model.weights.h5"))
        (tmp / "train_log.csv").write_bytes(_log_csv(rows))
        atomic_write_json(tmp / "state.json", {"step": step, "fingerprint": fp})
    atomic_write_json(checkpoints / CHECKPOINT_INDEX, {"latest": name, "step": step, "fingerprint": fp})
    for old in sorted(p for p in checkpoints.glob("ckpt-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return checkpoints / name


def latest_checkpoint(checkpoints: Path) -> dict[str, Any] | None:
    index = _read_json(checkpoints / CHECKPOINT_INDEX)
    if not index or not (checkpoints / index.get("latest", "") / "state.json").is_file():
        return None
    return index


def restore_checkpoint(folder: Path, detector, step: int) -> None:
    """Weights + optimizer state (``iterations`` included, so the LR schedule resumes too)."""
    detector.optimizer.build(detector.trainable_variables)  # so load_weights restores its variables
    detector.load_weights(str(folder / "model.weights.h5"))
    restored = int(detector.optimizer.iterations.numpy())
    if restored != step:
        raise TrainError(f"{folder}: optimizer state not restored (iterations {restored}, checkpoint step {step}); "
                         "delete the checkpoints folder to start over")


# ---------------------------------------------------------------------------- MLflow


class Tracker:
    """One MLflow run per training (continued on resume); metrics sent in batches at checkpoints."""

    def __init__(self, uri: str, checkpoints: Path, cfg, resume: bool, start: int):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pets")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = self.client.create_experiment(name, artifact_location=_artifact_root(uri))
        else:
            experiment_id = experiment.experiment_id
        previous = _read_json(checkpoints / RUN_FILE) if resume else None
        self.run_id = None
        if previous and previous.get("tracking_uri") == uri:
            try:
                self.run_id = self.client.get_run(previous["run_id"]).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "resumed_from_step", str(start))
            except Exception:  # deleted or from another store: start a new run
                self.run_id = None
        if self.run_id is None:
            root = repo_root()
            exp_name = os.environ.get("DVC_EXP_NAME", "")
            revision = git_revision(root)
            run = self.client.create_run(experiment_id, run_name=exp_name or None, tags={
                "dvc_exp_name": exp_name,
                "git_revision": revision,
                "mlflow.source.git.commit": revision,
                "stage": "train",
                "model": cfg.model.name,
                "dataset": cfg.dataset.name,
            })
            self.run_id = run.info.run_id
            params = flatten(OmegaConf.to_container(cfg, resolve=True))
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        atomic_write_json(checkpoints / RUN_FILE, {"run_id": self.run_id, "experiment_id": experiment_id,
                                                   "experiment_name": name, "tracking_uri": uri})
        self.pending: list[Any] = []

    def add(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(row[k]), now, int(row["step"])) for k in LOG_FIELDS[1:]]

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []

    def finish(self, final: Path, summary: dict[str, Any]) -> None:
        self.flush()
        if summary.get("seconds_per_step") is not None:  # None: nothing was trained in this call
            for key in ("seconds", "seconds_per_step"):
                self.client.log_metric(self.run_id, f"train_{key}", float(summary[key]))
        self.client.log_artifacts(self.run_id, str(final), FINAL)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:
            pass


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


# ---------------------------------------------------------------------------- the stage


def _strategy():
    """MirroredStrategy + mixed precision on GPUs; the default strategy in float32 on CPU."""
    import keras
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        keras.mixed_precision.set_global_policy("mixed_float16")
        return tf.distribute.MirroredStrategy(), True
    return tf.distribute.get_strategy(), False


def run(cfg, inputs: dict[str, Path], outputs: dict[str, Path], *, tracking_uri: str | None = None,
        callbacks: list | None = None) -> dict[str, Any]:
    """Train (or resume) into ``outputs["checkpoints"]``; write ``outputs["log"]``. See the module doc.

    ``inputs``: ``records`` (tfrecord stage output), ``pretrained`` (pretrained stage output;
    used when ``model.builder`` is ``preset``). ``callbacks``: extra Keras callbacks (tests).
    """
    import keras
    from tqdm import tqdm

    from detkit import data as D
    from detkit import model as M

    records, checkpoints, log_path = Path(inputs["records"]), Path(outputs["checkpoints"]), Path(outputs["log"])
    pretrained = Path(inputs["pretrained"]) if inputs.get("pretrained") else None
    t = cfg.train
    label_map = M.load_label_map(records)
    D.shard_files(records, "train")
    fp = fingerprint(cfg, records, pretrained)
    checkpoints.mkdir(parents=True, exist_ok=True)

    index = latest_checkpoint(checkpoints)
    if index and index["fingerprint"] != fp:
        print(f"train: {checkpoints} holds checkpoints of other params or data: starting from step 0")
        index = None
    if index is None:
        _clear(checkpoints)
    start = index["step"] if index else 0
    rows = []
    if index:
        rows = [r for r in _read_log(checkpoints / index["latest"] / "train_log.csv") if r["step"] <= start]
        print(f"train: resuming from {checkpoints / index['latest']} (step {start} of {t.steps})")

    strategy, mixed = _strategy()
    keras.utils.set_random_seed(int(t.seed))
    if t.deterministic:  # process-wide and permanent: fine for a stage process
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    schedule = make_schedule(t)
    with strategy.scope():
        detector = M.build_detector(cfg.model, len(label_map), pretrained)
        detector.compile(optimizer=make_optimizer(t, schedule),
                         loss_weights={"bbox_regression": 1.0, "cls_logits": float(t.class_loss_weight)})
        if index:
            restore_checkpoint(checkpoints / index["latest"], detector, start)
    size = M.input_size(detector)

    tracker = Tracker(tracking_uri or default_tracking_uri(), checkpoints, cfg, resume=index is not None, start=start)
    began = time.time()
    try:
        if start < t.steps:
            dataset = D.train_dataset(records, size, int(t.batch_size), t.augment, max_boxes=int(t.max_boxes),
                                      shuffle_buffer=int(t.shuffle_buffer), seed=int(t.seed) + start,
                                      deterministic=bool(t.deterministic))
            bar = tqdm(total=int(t.steps), initial=start, desc="train", unit="step", dynamic_ncols=True)
            logger = _make_step_logger()(checkpoints, log_path, detector, schedule, fp, rows, tracker, t, bar)
            with bar:
                detector.fit(dataset, epochs=int(t.steps), initial_epoch=start, steps_per_epoch=1, shuffle=False,
                             verbose=0, callbacks=[logger, *(callbacks or [])])
        else:
            atomic_write_bytes(log_path, _log_csv(rows))
        seconds = time.time() - began
        steps_run = int(t.steps) - start
        final = checkpoints / FINAL
        info = {
            "model": cfg.model.name,
            "builder": cfg.model.builder,
            "image_size": size,
            "num_classes": len(label_map),
            "label_offset": M.LABEL_OFFSET,
            "detection": OmegaConf.to_container(cfg.model.detection, resolve=True),
            "step": int(t.steps),
            "fingerprint": fp,
            "mlflow_run_id": tracker.run_id,
        }
        if (_read_json(final / M.INFO_FILE) or {}) != info:
            # An uncompiled float32 copy: no optimizer state in the files, loadable on any machine.
            keras.mixed_precision.set_global_policy("float32")
            plain = M.build_detector(cfg.model, len(label_map), pretrained)
            plain.set_weights(detector.get_weights())
            with atomic_dir(final) as tmp:
                M.save_trained(plain, tmp, info, records / M.LABEL_MAP_FILE)
        summary = {
            "model": cfg.model.name,
            "steps": int(t.steps),
            "start_step": start,
            "resumed": start > 0,
            "seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / steps_run, 4) if steps_run else None,
            "final_loss": rows[-1]["loss"] if rows else None,
            "final": str(final),
            "mlflow_run_id": tracker.run_id,
        }
        tracker.finish(final, summary)
    except BaseException:
        tracker.fail()
        raise
    finally:
        if mixed:
            keras.mixed_precision.set_global_policy("float32")
    print(f"train: {summary['steps']} steps (from {start}) in {summary['seconds']} s, final loss "
          f"{summary['final_loss']}; model in {summary['final']}; MLflow run {summary['mlflow_run_id']}")
    return summary


def _make_step_logger():
    import keras

    class StepLogger(keras.callbacks.Callback):
        """Per-step log row, progress bar, checkpoints every ``checkpoint_every`` steps and at the end."""

        def __init__(self, checkpoints, log_path, detector, schedule, fp, rows, tracker, t, bar):
            super().__init__()
            self.checkpoints, self.log_path, self.detector = checkpoints, log_path, detector
            self.schedule, self.fp, self.rows, self.tracker, self.t, self.bar = schedule, fp, rows, tracker, t, bar

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            step = epoch + 1  # one step per Keras epoch: logs hold this step's own loss
            row = {
                "step": step,
                "loss": float(logs.get("loss", float("nan"))),
                "box_loss": float(logs.get("bbox_regression_loss", float("nan"))),
                "class_loss": float(logs.get("cls_logits_loss", float("nan"))),
                "learning_rate": float(self.schedule(step - 1)),
            }
            self.rows.append(row)
            self.tracker.add(row)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['learning_rate']:.2e}")
            if step % int(self.t.checkpoint_every) == 0 or step == int(self.t.steps):
                save_checkpoint(self.checkpoints, self.detector, step, self.fp, self.rows, int(self.t.keep_checkpoints))
                atomic_write_bytes(self.log_path, _log_csv(self.rows))
                self.tracker.flush()

    return StepLogger


def main(argv: Iterable[str] | None = None) -> int:
    parser = stage_parser("stages.train", __doc__)
    parser.add_argument("--records", type=Path, required=True, help="tfrecord stage output")
    parser.add_argument("--pretrained", type=Path, default=None, help="pretrained stage output (builder 'preset')")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoints folder (persist: true)")
    parser.add_argument("--log", type=Path, required=True, help="per-step CSV for dvc plots")
    from detkit.data import DataError
    from detkit.model import ModelError

    return run_stage(parser, argv, lambda cfg, args: run(cfg, {"records": args.records, "pretrained": args.pretrained},
                                                         {"checkpoints": args.checkpoints, "log": args.log}),
                     errors=(ModelError, DataError, TrainError))


if __name__ == "__main__":
    sys.exit(main())
