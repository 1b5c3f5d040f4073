"""The train stage's checkpoints folder: what a run leaves, and what a re-run resumes from.

Layout of ``models/checkpoints/`` (the same after a local run and after a SageMaker job):

- ``ckpt-<step, 7 digits>/``: ``model.weights.h5`` (``save_weights`` of the compiled model:
  Keras 3 stores the optimizer's variables, ``iterations`` included, with the weights),
  ``state.json`` (step, fingerprint), ``train_log.csv`` and ``val_log.csv`` (the logs up to
  that step). Each written atomically; the newest ``train.keep_checkpoints`` are kept.
- ``checkpoint.json``: ``{"latest": "ckpt-...", "step": N, "fingerprint": ...}``, replaced
  atomically after the folder it names is complete: what a re-run resumes from.
- ``best/`` + ``best.json`` (``train.eval_every`` > 0): the weights of the best val AP50 so far
  and ``{"step", "AP50", "AP", "fingerprint"}``; a resumed run keeps competing against them.
- ``final/``: the trained model (``detkit.models.family.save_trained``), ``mlflow_run.json``: the MLflow run.

A checkpoint belongs to one fingerprint: model + train params (except those that only change
how often the run saves, logs or evaluates), the train shards' bytes and the pretrained preset.
Checkpoints of another fingerprint are discarded, never resumed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detkit.core.fsio import atomic_dir, atomic_write_json

LOG_FIELDS = ("step", "loss", "box_loss", "class_loss", "learning_rate")
VAL_FIELDS = ("step", "AP", "AP50", "AP75")
TRAIN_LOG, VAL_LOG = "train_log.csv", "val_log.csv"
INDEX = "checkpoint.json"
BEST, BEST_INDEX = "best", "best.json"
RUN_FILE = "mlflow_run.json"
FINAL = "final"
WEIGHTS = "model.weights.h5"
# Params that change how often the run saves, logs or evaluates, not what it computes.
NOT_FINGERPRINTED = ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "keep")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: names the folder and what to do."""


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
    if cfg.model.pretrained != "none" and pretrained is not None and pretrained.is_dir():
        _hash_files(sorted(p for p in pretrained.rglob("*") if p.is_file()), h)
    return h.hexdigest()[:16]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str] = LOG_FIELDS) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def read_log(path: Path, fields: Sequence[str] = LOG_FIELDS) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), **{k: float(r[k]) for k in fields[1:]}} for r in csv.DictReader(f)]


def clear(checkpoints: Path) -> None:
    """Remove a previous run's checkpoints (other params or data), best and final model, run file."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        if path.name.startswith(("ckpt-", ".ckpt-", ".best")) or path.name in (FINAL, INDEX, RUN_FILE, BEST,
                                                                                 BEST_INDEX):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def save(checkpoints: Path, detector, step: int, fp: str, logs: dict[str, bytes], keep: int) -> Path:
    """``ckpt-<step>/`` with weights + optimizer state and ``logs`` (file name -> bytes); then the index."""
    name = f"ckpt-{step:07d}"
    with atomic_dir(checkpoints / name) as tmp:
        detector.save_weights(str(tmp / WEIGHTS))
        for file, data in logs.items():
            (tmp / file).write_bytes(data)
        atomic_write_json(tmp / "state.json", {"step": step, "fingerprint": fp})
    atomic_write_json(checkpoints / INDEX, {"latest": name, "step": step, "fingerprint": fp})
    for old in sorted(p for p in checkpoints.glob("ckpt-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return checkpoints / name


def latest(checkpoints: Path) -> dict[str, Any] | None:
    index = read_json(checkpoints / INDEX)
    if not index or not (checkpoints / index.get("latest", "") / "state.json").is_file():
        return None
    return index


def restore(folder: Path, detector, step: int) -> None:
    """Weights + optimizer state (``iterations`` included, so the LR schedule resumes too)."""
    if not detector.optimizer.built:  # load_weights restores only the variables it has (built once:
        detector.optimizer.build(detector.trainable_variables)  # the loss-scale wrapper's build adds more)
    detector.load_weights(str(folder / WEIGHTS))
    restored = int(detector.optimizer.iterations.numpy())
    if restored != step:
        raise CheckpointError(f"{folder}: optimizer state not restored (iterations {restored}, checkpoint step "
                              f"{step}); delete the checkpoints folder to start over")


def save_best(checkpoints: Path, detector, record: dict[str, Any]) -> None:
    """The weights of a new best val AP50 in ``best/``, then ``best.json`` naming its step."""
    with atomic_dir(checkpoints / BEST) as tmp:
        detector.save_weights(str(tmp / WEIGHTS))
    atomic_write_json(checkpoints / BEST_INDEX, record)


def best(checkpoints: Path, fp: str) -> dict[str, Any] | None:
    record = read_json(checkpoints / BEST_INDEX)
    if not record or record.get("fingerprint") != fp or not (checkpoints / BEST / WEIGHTS).is_file():
        return None
    return record
