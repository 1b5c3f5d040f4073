"""DVC stage ``train``: TFRecords (+ pretrained preset) -> trained detector, checkpoints, logs, MLflow run.

Trains the detector of ``model.*`` (``detkit.model``) on the ``train`` records with
``train.*`` (optimizer, warmup + cosine/constant schedule, clipping, augmentation), with
Keras ``fit``, under the strategy, precision and XLA setting of ``detkit.distribute``
(``train.distribute``, ``train.mixed_precision``, ``train.jit_compile``; on GPUs: mixed
precision and all GPUs by default; more than one machine with ``TF_CONFIG``). With
``compute: sagemaker`` the same training runs as a SageMaker Training job
(``detkit.sagemaker_training``) and lands the same outputs here.

The loop stops every ``train.log_every`` steps (one Keras epoch each; more often where
``checkpoint_every``, ``eval_every`` or ``steps`` need a stop: their greatest common divisor),
so the stage's own work (log row, progress, MLflow) runs once per stop, not per step. At each
stop it appends a row to ``--log`` (CSV
``step,loss,box_loss,class_loss,learning_rate``: the mean losses of the steps since the last
row, ``loss`` = ``box_loss + train.class_loss_weight * class_loss``, and the rate of the row's
step); every ``train.checkpoint_every`` steps and at the end it writes a checkpoint
(``detkit.checkpoints``: the layout, what a re-run resumes from). Every ``train.eval_every``
steps (and at the end) it runs the eval stage's COCO evaluation on the val split and appends
``step,AP,AP50,AP75`` to ``--val-log``; the best val AP50 so far is kept in ``best/``, and with
``train.keep: best`` ``final/`` holds those weights instead of the last step's.

``final/`` is the model for eval and export (``detkit.model.save_trained``, always float32):
a KerasHub preset folder plus ``detkit.json`` (name, image_size, num_classes, label_offset,
detection settings, the step its weights are from, fingerprint, MLflow run id) and
``label_map.pbtxt``. The run is tracked in MLflow (``detkit.tracking``): params, losses and
val metrics per step (``val/AP50``), ``final/`` as artifact; eval adds to the same run.

With several workers only the chief writes (checkpoints, logs, ``final/``, MLflow); every
worker resumes from the checkpoint in its ``--checkpoints``, which must be the chief's
(a shared folder, or on SageMaker the synced checkpoint folder).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detkit import checkpoints as CK
from detkit.cli import run_stage, stage_parser
from detkit.fsio import atomic_dir, atomic_write_bytes


class TrainError(ValueError):
    """Training cannot start: names the input to fix."""


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


def stop_interval(t, start: int) -> int:
    """Steps between stops: ``log_every``, or fewer so that every save, eval and the end is a stop."""
    return math.gcd(int(t.log_every), int(t.checkpoint_every), int(t.eval_every), int(t.steps), start)


# ---------------------------------------------------------------------------- the stage


def run(cfg, inputs: dict[str, Path], outputs: dict[str, Path], *, tracking_uri: str | None = None,
        callbacks: list | None = None, track: bool = True) -> dict[str, Any]:
    """Train (or resume) into ``outputs["checkpoints"]``; write ``outputs["log"]`` and ``["val_log"]``.

    ``inputs``: ``records`` (tfrecord stage output), ``pretrained`` (pretrained stage output;
    used when ``model.builder`` is ``preset``). ``callbacks``: extra Keras callbacks, called after
    each stop (tests). ``track=False``: no MLflow run (inside a SageMaker job: the runner tracks).
    """
    if cfg.compute.name == "sagemaker":
        from detkit import sagemaker_training

        return sagemaker_training.run(cfg, inputs, outputs)

    import keras
    from tqdm import tqdm

    from detkit import data as D
    from detkit import distribute
    from detkit import model as M
    from detkit.labelmap import read_label_map

    records, checkpoints = Path(inputs["records"]), Path(outputs["checkpoints"])
    pretrained = Path(inputs["pretrained"]) if inputs.get("pretrained") else None
    t = cfg.train
    label_map = M.load_label_map(records)
    D.shard_files(records, "train")
    fp = CK.fingerprint(cfg, records, pretrained)
    try:
        plan = distribute.plan(t)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc

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
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    schedule = make_schedule(t)
    interval = stop_interval(t, start)
    with plan.strategy.scope():
        detector = M.build_detector(cfg.model, len(label_map), pretrained)
        # One step per call (Keras' default): its multi-step loop (steps_per_execution) made a CPU step
        # 1.8x slower in benchmarks/train_loop.py and fails under tf.distribute strategies (keras 3.15).
        detector.compile(optimizer=make_optimizer(t, schedule), jit_compile=plan.jit_compile,
                         loss_weights={"bbox_regression": 1.0, "cls_logits": float(t.class_loss_weight)})
        if index:
            CK.restore(checkpoints / index["latest"], detector, start)
    size = M.input_size(detector)

    tracker = None
    if track and plan.chief:
        from detkit.tracking import Tracker

        tracker = Tracker(cfg, checkpoints / CK.RUN_FILE, resume=index is not None, start_step=start, uri=tracking_uri)
    began = time.time()
    try:
        if start < t.steps:
            dataset = D.train_dataset(records, size, int(t.batch_size), t.augment, max_boxes=int(t.max_boxes),
                                      shuffle_buffer=int(t.shuffle_buffer), seed=int(t.seed) + start,
                                      deterministic=bool(t.deterministic))
            if plan.workers > 1:
                dataset = distribute.shard_by_data(dataset)
            validation = (Validation(cfg, detector, records, read_label_map(records / M.LABEL_MAP_FILE), best)
                          if t.eval_every else None)
            bar = tqdm(total=int(t.steps), initial=start, desc="train", unit="step", dynamic_ncols=True,
                       disable=not plan.chief)
            loop = _loop_callback()(cfg, checkpoints, detector, schedule, fp, logs, tracker, validation, plan.chief,
                                    interval, bar)
            with bar:
                distribute.fit(detector, dataset, plan, epochs=int(t.steps) // interval,
                               initial_epoch=start // interval, steps_per_epoch=interval,
                               callbacks=[loop, *(callbacks or [])])
            best = validation.best if validation else best
        elif plan.chief:
            logs.write()
        summary = {
            "model": cfg.model.name,
            "steps": int(t.steps),
            "start_step": start,
            "resumed": start > 0,
            "seconds": round(time.time() - began, 1),
            "chief": plan.chief,
            "final_loss": logs.rows[-1]["loss"] if logs.rows else None,
            "best": best,
            "mlflow_run_id": tracker.run_id if tracker else None,
        }
        steps_run = int(t.steps) - start
        summary["seconds_per_step"] = round(summary["seconds"] / steps_run, 4) if steps_run else None
        if plan.chief:
            summary["final"] = str(_write_final(cfg, checkpoints, detector, label_map, size, fp, best, tracker,
                                                pretrained, records))
        if tracker:
            metrics = {f"train_{k}": summary[k] for k in ("seconds", "seconds_per_step")
                       if summary[k] is not None and steps_run}
            tracker.finish({CK.FINAL: checkpoints / CK.FINAL}, metrics)
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


def _write_final(cfg, checkpoints: Path, detector, label_map, size: int, fp: str, best, tracker, pretrained,
                 records: Path) -> Path:
    """``final/``: an uncompiled float32 copy of the kept weights (last, or best val AP50)."""
    import keras

    from detkit import model as M

    use_best = cfg.train.keep == "best" and best is not None
    info = {
        "model": cfg.model.name,
        "builder": cfg.model.builder,
        "image_size": size,
        "num_classes": len(label_map),
        "label_offset": M.LABEL_OFFSET,
        "detection": OmegaConf.to_container(cfg.model.detection, resolve=True),
        "step": int(best["step"]) if use_best else int(cfg.train.steps),
        "keep": cfg.train.keep,
        "fingerprint": fp,
        "mlflow_run_id": tracker.run_id if tracker else None,
    }
    final = checkpoints / CK.FINAL
    if (CK.read_json(final / M.INFO_FILE) or {}) != info:
        if use_best:
            detector.load_weights(str(checkpoints / CK.BEST / CK.WEIGHTS))
        keras.mixed_precision.set_global_policy("float32")
        plain = M.build_detector(cfg.model, len(label_map), pretrained)
        plain.set_weights(detector.get_weights())
        with atomic_dir(final) as tmp:
            M.save_trained(plain, tmp, info, records / M.LABEL_MAP_FILE)
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

    def __init__(self, cfg, detector, records: Path, label_map: dict[int, str], best: dict[str, Any] | None):
        from detkit import model as M

        self.cfg, self.records, self.label_map, self.best = cfg, records, label_map, best
        # Traced once: the graph reads the detector's variables, so every evaluation sees the current weights.
        decoder = M.make_decoder(detector, OmegaConf.to_container(cfg.model.detection, resolve=True))
        self.detect, self.size = M.detection_function(detector, decoder), M.input_size(detector)

    def __call__(self, step: int) -> dict[str, Any]:
        from detkit.coco import evaluate, predict_split

        results, _ = predict_split(self.detect, self.size, self.records, int(self.cfg.eval.batch_size),
                                   with_encoded=False)
        metrics = evaluate(results, self.label_map, backend=self.cfg.eval.coco_backend)["metrics"]
        return {"step": step, **{k: float(metrics[k]) for k in CK.VAL_FIELDS[1:]}}

    def improves(self, row: dict[str, Any]) -> bool:
        return self.best is None or row["AP50"] > self.best["AP50"]


def _loop_callback():
    import keras

    class Loop(keras.callbacks.Callback):
        """At each stop: a log row, progress, and when due a val evaluation and a checkpoint."""

        def __init__(self, cfg, checkpoints, detector, schedule, fp, logs, tracker, validation, chief, interval, bar):
            super().__init__()
            self.t, self.checkpoints, self.detector, self.schedule = cfg.train, checkpoints, detector, schedule
            self.fp, self.logs, self.tracker, self.validation, self.chief = fp, logs, tracker, validation, chief
            self.interval, self.bar = interval, bar

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            step = (epoch + 1) * self.interval  # one Keras epoch per stop: logs hold the mean since the last one
            row = {
                "step": step,
                "loss": float(logs.get("loss", float("nan"))),
                "box_loss": float(logs.get("bbox_regression_loss", float("nan"))),
                "class_loss": float(logs.get("cls_logits_loss", float("nan"))),
                "learning_rate": float(self.schedule(step - 1)),
            }
            self.logs.rows.append(row)
            if self.tracker:
                self.tracker.add([row], CK.LOG_FIELDS)
            self.bar.update(self.interval)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['learning_rate']:.2e}")
            last = step == int(self.t.steps)
            evaluate = bool(self.validation) and (step % int(self.t.eval_every) == 0 or last)
            save = step % int(self.t.checkpoint_every) == 0 or last
            if evaluate:
                self._validate(step)
            if self.chief and (evaluate or save):
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
                self.bar.write(f"train: step {step}: val AP {row['AP']:.3f}  AP50 {row['AP50']:.3f}"
                               + ("  (best so far)" if better else ""))

    return Loop


def main(argv: Iterable[str] | None = None) -> int:
    from detkit import training_contract
    from detkit.config import ConfigError, load_config
    from detkit.data import DataError
    from detkit.model import ModelError
    from detkit.sagemaker_training import TrainingJobError

    errors = (ModelError, DataError, TrainError, CK.CheckpointError, TrainingJobError,
              training_contract.ContractError)
    try:
        contract = training_contract.from_environment()
        if contract is not None:  # inside a SageMaker Training job: its contract names the paths and params
            cfg = load_config(contract.params, overrides=contract.overrides)
            contract.publish(run(cfg, contract.inputs, contract.outputs, track=False))
            return 0
    except (ConfigError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = stage_parser("stages.train", __doc__)
    parser.add_argument("--records", type=Path, required=True, help="tfrecord stage output")
    parser.add_argument("--pretrained", type=Path, default=None, help="pretrained stage output (builder 'preset')")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoints folder (persist: true)")
    parser.add_argument("--log", type=Path, required=True, help="train log CSV for dvc plots")
    parser.add_argument("--val-log", type=Path, required=True, help="val log CSV (train.eval_every) for dvc plots")
    return run_stage(parser, argv, lambda cfg, args: run(
        cfg, {"records": args.records, "pretrained": args.pretrained},
        {"checkpoints": args.checkpoints, "log": args.log, "val_log": args.val_log}), errors=errors)


if __name__ == "__main__":
    sys.exit(main())
