"""Where and how the train step runs: strategy, mixed precision, XLA; who is the chief.

``train.distribute``:

- ``none``: TensorFlow's default strategy (one device).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over all local GPUs, or, on a machine without
  GPUs, over all logical CPU devices (one unless the process split the CPU, as the tests do).
- ``multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` from ``TF_CONFIG``, which names
  every worker (``host:port``) and this process's place among them. SageMaker's TensorFlow
  toolkit writes it on each instance when the job asks for multi-worker mirrored strategy; on
  one's own machines it is set by hand (docs/training.md: "Training on several machines").
- ``auto``: ``multi_worker`` where ``TF_CONFIG`` names two or more workers, ``mirrored`` where
  there are GPUs, ``none`` otherwise.

``train.batch_size`` is always the global batch: each step's batch is split over all replicas
of all workers. ``train.mixed_precision``: ``auto`` is ``mixed_float16`` on GPUs and float32
otherwise, and float32 for a family that cannot train in float16 (``Family.mixed_float16``), for
which ``true`` is an error. ``train.jit_compile``: ``auto`` lets Keras decide (XLA only where every layer
supports it and op determinism is off).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from detkit.models import family as F


@dataclass
class Plan:
    strategy: Any
    kind: str  # none | mirrored | multi_worker
    mixed_precision: bool
    jit_compile: bool | str  # True | False | "auto" (Keras' own choice)
    workers: int
    chief: bool  # this process writes checkpoints, the final model, the logs and the MLflow run

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def describe(self) -> str:
        where = f"{self.workers} workers, " if self.workers > 1 else ""
        return (f"{self.kind} strategy ({where}{self.replicas} replicas), "
                f"{'mixed_float16' if self.mixed_precision else 'float32'}, jit_compile {self.jit_compile}")


def cluster_workers(environ=os.environ) -> int:
    """How many workers ``TF_CONFIG`` names (chief included); 1 without it."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        return 1
    try:
        cluster = json.loads(raw).get("cluster", {})
    except ValueError as exc:
        raise ValueError(f"TF_CONFIG: not valid JSON ({exc})") from exc
    return sum(len(cluster.get(role, [])) for role in ("chief", "worker"))


def _switch(value: str) -> bool | None:
    """``auto`` -> None, ``true``/``false`` -> bool (YAML booleans arrive as 'True'/'False')."""
    value = str(value).lower()
    return None if value == "auto" else value == "true"


def _refuse_float32_only(family: F.Family) -> None:
    if not family.mixed_float16:
        raise ValueError(f"train.mixed_precision: true, but the {family.name} family trains in float32 only "
                         "(docs/training.md: Precision, devices, XLA); set it to auto or false")


def check_precision(setting, family_name: str) -> None:
    """Refuses ``train.mixed_precision: true`` (``setting``) for a family that trains in float32 only.
    Only ``true`` loads the family's module (and TensorFlow with it): a SageMaker submission does not."""
    if _switch(setting):
        _refuse_float32_only(F.family(family_name))


def mixed_precision(setting, gpus: bool, family: F.Family) -> bool:
    """Whether to train under mixed_float16: ``train.mixed_precision`` (``setting``) on this machine
    (``gpus``: it has any) for ``family``."""
    mixed = _switch(setting)
    if mixed:
        _refuse_float32_only(family)
    return (gpus and family.mixed_float16) if mixed is None else mixed


def plan(t, family: F.Family, environ=os.environ) -> Plan:
    """The strategy for ``train.*`` and the model's ``family``. Call before any other TensorFlow op
    (multi-worker needs that)."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    mixed = mixed_precision(t.mixed_precision, bool(gpus), family)  # a refusal before any strategy starts
    workers = cluster_workers(environ)
    kind = t.distribute
    if kind == "auto":
        kind = "multi_worker" if workers > 1 else "mirrored" if gpus else "none"
    if kind == "multi_worker":
        if workers < 2:
            raise ValueError("train.distribute: multi_worker needs TF_CONFIG naming at least two workers "
                             "(docs/training.md: Training on several machines)")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        chief = resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                                   and "chief" not in resolver.cluster_spec().as_dict())
    elif kind == "mirrored":
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy, chief, workers = tf.distribute.MirroredStrategy(devices), True, 1
    else:
        strategy, chief, workers = tf.distribute.get_strategy(), True, 1
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    jit = _switch(t.jit_compile)
    return Plan(strategy, kind, mixed, "auto" if jit is None else jit, workers, chief)


def fit(model, dataset, plan: Plan, *, epochs: int, initial_epoch: int, steps_per_epoch: int, callbacks) -> None:
    """``model.fit``, or under MultiWorkerMirroredStrategy the same loop written out.

    Keras 3.15's ``fit`` fails under the multi-worker strategy (its symbolic build reduces a
    nested input batch, and its train function reduces scalar logs along axis 0, neither of
    which the strategy supports), so there each step is ``strategy.run(model.train_step)`` with
    the logs reduced across replicas; callbacks see the same ``on_epoch_end`` logs as under fit.
    """
    if plan.kind != "multi_worker":
        model.fit(dataset, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                  shuffle=False, verbose=0, callbacks=callbacks)
        return
    import tensorflow as tf

    strategy = plan.strategy
    batches = iter(strategy.experimental_distribute_dataset(
        dataset.map(model.preprocess_samples, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)))

    @tf.function
    def train_step(iterator):
        logs = strategy.run(model.train_step, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in logs.items()}

    for callback in callbacks:
        callback.set_model(model)
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()  # epoch logs are means since the last stop, as under fit
        for _ in range(steps_per_epoch):
            logs = train_step(batches)
        logs = {name: float(value) for name, value in logs.items()}
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)


def weights_digest(model) -> str:
    """sha256 of the trainable weights, in order: equal on all workers when they trained in step.

    Batch-norm moving statistics are left out: each worker updates them from its own batches
    (Keras' BatchNormalization is not synchronised across workers); ``final/`` has the chief's."""
    import hashlib

    h = hashlib.sha256()
    for weight in [v.numpy() for v in model.trainable_weights]:
        h.update(weight.astype("float32").tobytes())
    return h.hexdigest()[:16]


def shard_by_data(dataset):
    """Every worker reads all shards and keeps its share of the batches: works for any shard count."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
