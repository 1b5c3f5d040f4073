"""DVC stage ``train``: TFRecords (+ pretrained weights) -> trained detector, checkpoints, logs, MLflow run.

Trains the detector of ``model.*`` (any family, ``detkit.models``) on the ``train`` records with
``train.*`` (optimizer, warmup + cosine/constant schedule, clipping, augmentation) under the
strategy, precision and XLA setting of ``detkit.train.distribute``; the loop, its logs,
checkpoints, validation and ``final/`` are ``detkit.train.loop``'s. With ``compute: sagemaker``
the same training runs as a SageMaker Training job (``detkit.cloud.training_job``) and lands the
same outputs here; inside that job, the job's contract (``detkit.cloud.training_contract``)
names the paths and params instead of the command line.

    python -m stages.train --records data/records --pretrained models/pretrained \\
        --checkpoints models/checkpoints --log plots/train_log.csv --val-log plots/val_log.csv
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from detkit.cloud import training_contract, training_job
from detkit.config import ConfigError, load_config
from detkit.config.cli import command_parser, fail, run_stage
from detkit.models.family import ModelError
from detkit.train.checkpoints import CheckpointError


def errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix; two live in modules that import TensorFlow, so this is called only
    once one is raised, and a bad override fails before TensorFlow loads."""
    from detkit.data.pipeline import DataError
    from detkit.train.loop import TrainError

    return (ModelError, DataError, CheckpointError, TrainError, training_job.TrainingJobError,
            training_contract.ContractError)


def run(cfg, inputs: dict[str, Path], outputs: dict[str, Path], **options) -> dict[str, Any]:
    """Train here or, with ``compute: sagemaker``, in a SageMaker Training job; ``options`` go to
    ``detkit.train.loop.train`` (tests: ``tracking_uri``, ``callbacks``, ``track``)."""
    if cfg.compute.name == "sagemaker":
        return training_job.run(cfg, inputs, outputs)
    from detkit.train import loop  # TensorFlow: only where this machine trains

    return loop.train(cfg, inputs, outputs, **options)


def main(argv: Iterable[str] | None = None) -> int:
    try:
        contract = training_contract.from_environment()
        if contract is not None:  # inside a SageMaker Training job: no bar, a progress line per stop for its logs
            cfg = load_config(contract.params, overrides=contract.overrides)
            contract.publish(run(cfg, contract.inputs, contract.outputs, track=False, bar=False))
            return 0
    except ConfigError as exc:
        return fail(exc)
    except errors() as exc:
        return fail(exc)
    parser = command_parser("stages.train", __doc__)
    parser.add_argument("--records", type=Path, required=True, help="tfrecord stage output")
    parser.add_argument("--pretrained", type=Path, default=None, help="pretrained stage output")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoints folder (persist: true)")
    parser.add_argument("--log", type=Path, required=True, help="train log CSV for dvc plots")
    parser.add_argument("--val-log", type=Path, required=True, help="val log CSV (train.eval_every) for dvc plots")
    return run_stage(parser, argv, lambda cfg, args: run(
        cfg, {"records": args.records, "pretrained": args.pretrained},
        {"checkpoints": args.checkpoints, "log": args.log, "val_log": args.val_log}), errors=errors)


if __name__ == "__main__":
    sys.exit(main())
