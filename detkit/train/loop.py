"""The training loop: any detector family (``detkit.models.family``) trained, checkpointed,
validated and tracked, resumed where a run left off.

The loop stops every ``train.log_every`` steps (one Keras epoch each; more often where
``checkpoint_every``, ``eval_every`` or ``steps`` need a stop: their greatest common divisor),
so its own work (log row, progress, MLflow) runs once per stop, not per step. At each stop it
appends a row to the train log (CSV ``step,loss,box_loss,class_loss,learning_rate``: the mean
losses of the steps since the last row, as the family splits them, and the rate of the row's
step); every ``train.checkpoint_every`` steps and at the end it writes a checkpoint
(``detkit.train.checkpoints``: the layout, what a re-run resumes from). Every
``train.eval_every`` steps (and at the end) it runs the eval stage's COCO evaluation on the val
split and appends ``step,AP,AP50,AP75`` to the val log; the best val AP50 so far is kept in
``best/``, and with ``train.keep: best`` ``final/`` holds those weights instead of the last step's.

``final/`` is the model for eval and export (``detkit.models.family.save_trained``, always
float32) with ``detkit.json`` (family, name, image_size, num_classes, detection settings, the
step its weights are from, fingerprint, MLflow run id) and ``label_map.pbtxt``.

With several workers only the chief writes (checkpoints, logs, ``final/``, MLflow); every
worker resumes from the checkpoint in its checkpoints folder, which must be the chief's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from omegaconf import OmegaConf
from tqdm import tqdm

from detkit.core import tflog
from detkit.core.fsio import atomic_dir, atomic_write_bytes
from detkit.data import pipeline
from detkit.data.labelmap import read_label_map
from detkit.eval.coco import evaluate, predict_split
from detkit.models import family as F
from detkit.train import checkpoints as CK
from detkit.train import distribute, progress
from detkit.train.optimizer import make_optimizer, make_schedule, stop_interval
from detkit.train.tracking import Tracker

MEASURED = ("parameters", "train_images_per_second")  # detkit.json keys of the training run's figures


class TrainError(ValueError):
    """Training cannot start: names the input to fix."""


def train(cfg, inputs: dict[str, Path], outputs: dict[str, Path], *, tracking_uri: str | None = None,
          callbacks: list | None = None, track: bool = True, bar: bool = True) -> dict[str, Any]:
    """Train (or resume) into ``outputs["checkpoints"]``; write ``outputs["log"]`` and ``["val_log"]``.

    ``inputs``: ``records`` (tfrecord stage output), ``pretrained`` (pretrained stage output).
    ``callbacks``: extra Keras callbacks, called after each stop (tests). ``track=False``: no MLflow
    run. ``bar=False``: a ``progress.STEP`` line per stop instead of a progress bar (log files).
    """
    records, checkpoints = Path(inputs["records"]), Path(outputs["checkpoints"])
    pretrained = Path(inputs["pretrained"]) if inputs.get("pretrained") else None
    t = cfg.train
    label_map = F.load_label_map(records)
    pipeline.shard_files(records, "train")
    fp = CK.fingerprint(cfg, records, pretrained)
    fam = F.family(cfg.model.family)
    try:
        plan = distribute.plan(t, fam)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    tflog.log_onednn_notice()

    index = CK.latest(checkpoints)
    if index and index["fingerprint"] != fp:
        print(f"train: {checkpoints} holds checkpoints of other params or data: starting from step 0")
        index = None
    if plan.chief:
        checkpoints.mkdir(parents=True, exist_ok=True)
        if index is None:
            CK.clear(checkpoints)
    start = index["step"] if index else 0
    logs = Logs(outputs, checkpoints / index["latest"] if index else None, start)
    best = CK.best(checkpoints, fp) if index else None
    if index:
        print(f"train: resuming from {checkpoints / index['latest']} (step {start} of {t.steps})")
    print(f"train: {plan.describe()}")

    keras.utils.set_random_seed(int(t.seed))
    if t.deterministic:  # process-wide and permanent: fine for a stage process
        tf.config.experimental.enable_op_determinism()
    schedule = make_schedule(t)
    interval = stop_interval(t, start)
    with plan.strategy.scope():
        built = F.build(cfg.model, len(label_map), pretrained)
        detector = built.model
        # One step per call (Keras' default): its multi-step loop (steps_per_execution) made a CPU step
        # 1.8x slower in benchmarks/train_loop.py and fails under tf.distribute strategies (keras 3.15).
        fam.compile(detector, make_optimizer(t, schedule), t, plan.jit_compile)
        # Its slots made now, not while Keras traces the train step: variables created in a
        # tf.function's first trace make TensorFlow trace it a second time (D-FINE tiny: 30 s each).
        detector.optimizer.build(detector.trainable_variables)
        if index:
            CK.restore(checkpoints / index["latest"], detector, start)
    if not index:
        print(f"train: {cfg.model.name}: {built.describe()}")
    size = int(cfg.model.image_size)

    tracker = (Tracker(cfg, checkpoints / CK.RUN_FILE, resume=index is not None, start_step=start, uri=tracking_uri)
               if track and plan.chief else None)
    began = time.time()
    try:
        if start < t.steps:
            dataset = pipeline.train_dataset(
                records, size, int(t.batch_size), t.augment, max_boxes=int(t.max_boxes),
                shuffle_buffer=int(t.shuffle_buffer), seed=int(t.seed) + start, deterministic=bool(t.deterministic),
                targets=fam.training_targets)
            if plan.workers > 1:
                dataset = distribute.shard_by_data(dataset)
            validation = (Validation(cfg, fam, detector, records, read_label_map(records / F.LABEL_MAP_FILE), best)
                          if t.eval_every else None)
            shown = tqdm(total=int(t.steps), initial=start, desc="train", unit="step", dynamic_ncols=True,
                         disable=not (plan.chief and bar))
            loop = Loop(cfg, fam, checkpoints, detector, schedule, fp, logs, tracker, validation, plan.chief,
                        interval, shown, print_steps=plan.chief and not bar)
            with shown:
                distribute.fit(detector, dataset, plan, epochs=int(t.steps) // interval,
                               initial_epoch=start // interval, steps_per_epoch=interval,
                               callbacks=[loop, *(callbacks or [])])
            best = validation.best if validation else best
        elif plan.chief:
            logs.write()
        steps_run = int(t.steps) - start
        seconds = round(time.time() - began, 1)
        summary = {
            "model": cfg.model.name,
            "steps": int(t.steps),
            "start_step": start,
            "resumed": start > 0,
            "seconds": seconds,
            "seconds_per_step": round(seconds / steps_run, 4) if steps_run else None,
            "chief": plan.chief,
            "final_loss": logs.rows[-1]["loss"] if logs.rows else None,
            "best": best,
            "mlflow_run_id": tracker.run_id if tracker else None,
            "parameters": int(detector.count_params()),
        }
        if steps_run:
            summary["images_per_second"] = round(steps_run * int(t.batch_size) / max(seconds, 1e-9), 2)
        if plan.chief:
            measured = {"parameters": summary["parameters"],
                        "train_images_per_second": summary.get("images_per_second")}
            summary["final"] = str(write_final(cfg, fam, checkpoints, detector, label_map, fp, best, tracker,
                                               pretrained, records, measured))
        if tracker:
            metrics = {f"train_{k}": summary[k] for k in ("seconds", "seconds_per_step", "images_per_second")
                       if summary.get(k) is not None}
            tracker.finish({CK.FINAL: checkpoints / CK.FINAL}, {**metrics, "parameters": summary["parameters"]})
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    finally:
        keras.mixed_precision.set_global_policy("float32")
    if plan.workers > 1:
        print(f"train: {'chief' if plan.chief else 'worker'} finished at step {t.steps}, trainable weights digest "
              f"{distribute.weights_digest(detector)}")
    if plan.chief:
        print(f"train: {summary['steps']} steps (from {start}) in {summary['seconds']} s, final loss "
              f"{summary['final_loss']}; model in {summary['final']}"
              + (f" (weights of step {best['step']}, best val AP50 {best['AP50']:.3f})"
                 if t.keep == "best" and best else "")
              + (f"; MLflow run {summary['mlflow_run_id']}" if tracker else ""))
    return summary


def write_final(cfg, fam, checkpoints: Path, detector, label_map, fp: str, best, tracker, pretrained,
                records: Path, measured: dict[str, Any]) -> Path:
    """``final/``: an uncompiled float32 copy of the kept weights (last, or best val AP50).

    ``measured`` (parameter count, training images/s) goes into ``detkit.json`` for eval's metrics;
    a run that trained no step keeps the figures of the run that did."""
    use_best = cfg.train.keep == "best" and best is not None
    info = {
        "model": cfg.model.name,
        "family": fam.name,
        "image_size": int(cfg.model.image_size),
        "num_classes": len(label_map),
        "label_offset": F.LABEL_OFFSET,
        "detection": OmegaConf.to_container(cfg.model.detection, resolve=True),
        "step": int(best["step"]) if use_best else int(cfg.train.steps),
        "keep": cfg.train.keep,
        "fingerprint": fp,
        "mlflow_run_id": tracker.run_id if tracker else None,
    }
    final = checkpoints / CK.FINAL
    written = CK.read_json(final / F.INFO_FILE) or {}
    if {k: v for k, v in written.items() if k not in MEASURED} != info:
        info.update(measured)
        if use_best:
            detector.load_weights(str(checkpoints / CK.BEST / CK.WEIGHTS))
        keras.mixed_precision.set_global_policy("float32")
        plain = F.build(cfg.model, len(label_map), pretrained).model
        plain.set_weights(detector.get_weights())
        with atomic_dir(final) as tmp:
            F.save_trained(fam, plain, tmp, info, records / F.LABEL_MAP_FILE)
    return final


class Logs:
    """The train and val logs: rows up to the resumed step, appended at each stop."""

    def __init__(self, outputs: dict[str, Path], resumed_from: Path | None, start: int):
        self.paths = {CK.TRAIN_LOG: Path(outputs["log"]), CK.VAL_LOG: Path(outputs["val_log"])}
        self.rows = self._resumed(resumed_from, CK.TRAIN_LOG, CK.LOG_FIELDS, start)
        self.val_rows = self._resumed(resumed_from, CK.VAL_LOG, CK.VAL_FIELDS, start)

    @staticmethod
    def _resumed(folder: Path | None, name: str, fields, start: int) -> list[dict[str, Any]]:
        return [r for r in CK.read_log(folder / name, fields) if r["step"] <= start] if folder else []

    def contents(self) -> dict[str, bytes]:
        return {CK.TRAIN_LOG: CK.log_csv(self.rows, CK.LOG_FIELDS),
                CK.VAL_LOG: CK.log_csv(self.val_rows, CK.VAL_FIELDS)}

    def write(self) -> dict[str, bytes]:
        contents = self.contents()
        for name, data in contents.items():
            atomic_write_bytes(self.paths[name], data)
        return contents


class Validation:
    """The val split's COCO evaluation, with the eval stage's code, and the best AP50 so far."""

    def __init__(self, cfg, fam, detector, records: Path, label_map: dict[int, str], best: dict[str, Any] | None):
        self.cfg, self.records, self.label_map, self.best = cfg, records, label_map, best
        self.size = int(cfg.model.image_size)
        # Traced once: the graph reads the detector's variables, so every evaluation sees the current weights.
        detection = OmegaConf.to_container(cfg.model.detection, resolve=True)
        self.detect = F.detection_function(fam, detector, self.size, detection)

    def __call__(self, step: int) -> dict[str, Any]:
        results, _ = predict_split(self.detect, self.size, self.records, int(self.cfg.eval.batch_size),
                                   with_encoded=False)
        metrics = evaluate(results, self.label_map, backend=self.cfg.eval.coco_backend)["metrics"]
        return {"step": step, **{k: float(metrics[k]) for k in CK.VAL_FIELDS[1:]}}

    def improves(self, row: dict[str, Any]) -> bool:
        return self.best is None or row["AP50"] > self.best["AP50"]


class Loop(keras.callbacks.Callback):
    """At each stop: a log row, progress, and when due a val evaluation and a checkpoint."""

    def __init__(self, cfg, fam, checkpoints, detector, schedule, fp, logs, tracker, validation, chief, interval, bar,
                 print_steps: bool = False):
        super().__init__()
        self.t, self.fam, self.checkpoints, self.detector = cfg.train, fam, checkpoints, detector
        self.schedule = schedule
        self.fp, self.logs, self.tracker, self.validation, self.chief = fp, logs, tracker, validation, chief
        self.interval, self.bar, self.print_steps = interval, bar, print_steps

    def on_epoch_end(self, epoch, logs=None):
        step = (epoch + 1) * self.interval  # one Keras epoch per stop: logs hold the mean since the last one
        row = {"step": step, **self.fam.loss_parts(logs or {}), "learning_rate": float(self.schedule(step - 1))}
        self.logs.rows.append(row)
        if self.tracker:
            self.tracker.add([row], CK.LOG_FIELDS)
        self.bar.update(self.interval)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['learning_rate']:.2e}")
        if self.print_steps:
            print(progress.STEP.format(steps=int(self.t.steps), **row), flush=True)
        last = step == int(self.t.steps)
        evaluate_now = bool(self.validation) and (step % int(self.t.eval_every) == 0 or last)
        save = step % int(self.t.checkpoint_every) == 0 or last
        if evaluate_now:
            self._validate(step)
        if self.chief and (evaluate_now or save):
            contents = self.logs.write()  # once per stop, for the evaluation and the checkpoint alike
            if save:
                CK.save(self.checkpoints, self.detector, step, self.fp, contents, int(self.t.keep_checkpoints))
                if self.tracker:
                    self.tracker.flush()

    def _validate(self, step: int) -> None:
        row = self.validation(step)
        self.logs.val_rows.append(row)
        better = self.validation.improves(row)
        if better:
            self.validation.best = {**row, "fingerprint": self.fp}
            if self.chief:
                CK.save_best(self.checkpoints, self.detector, self.validation.best)
        if self.chief:
            if self.tracker:
                self.tracker.add([row], CK.VAL_FIELDS, prefix="val/")
            self.bar.write(progress.VALIDATION.format(**row) + ("  (best so far)" if better else ""))
