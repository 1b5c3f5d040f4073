"""Inside a SageMaker Training job: the train stage's paths and config from SageMaker's training contract.

How AWS's TensorFlow training image starts the job (its ``sagemaker-training`` and
``sagemaker-tensorflow-training`` toolkits): it downloads ``sagemaker_submit_directory`` (the
``sourcedir.tar.gz`` that ``detkit.cloud.training_job`` uploads) into ``/opt/ml/code``, runs
``pip install -r requirements.txt`` there, and starts ``python <sagemaker_program> --<key> <value> ...``
(every hyperparameter except the toolkit's own ``sagemaker_*``, joined into one ``/bin/sh`` command
line unquoted) with ``/opt/ml/code`` as working directory and on ``PYTHONPATH``, and ``SM_*``
variables describing the job. With ``sagemaker_multi_worker_mirrored_strategy_enabled`` it also
sets ``TF_CONFIG``, listing every host as a worker (``<host>:8890``) and this host's index among
them, which ``detkit.train.distribute`` turns into ``MultiWorkerMirroredStrategy``.

The program (``ENTRY_POINT``) runs ``stages.train``'s ``main``, which calls ``from_environment()``;
the command-line copy of the hyperparameters is ignored. What is read here:

- ``SM_MODEL_DIR`` (``/opt/ml/model``): uploaded as ``model.tar.gz`` when the job ends. Its
  presence is what "inside a job" means.
- ``SM_CHANNEL_RECORDS``, ``SM_CHANNEL_PRETRAINED``: the channels' local copies (the second only
  when ``model.pretrained`` is not ``none``).
- ``<base>/input/config/hyperparameters.json``, each value a JSON document (SageMaker passes
  strings; ``hyperparameters()`` encodes, as SageMaker's Python SDK does). ``<base>`` is
  ``$SAGEMAKER_BASE_DIR`` (the toolkit's own setting, which the tests use) or ``/opt/ml``.
- ``<base>/checkpoints``: the job's ``CheckpointConfig`` local path, restored from S3 when the
  job (re)starts and synced back while it runs, so spot restarts and new attempts resume.
- ``SM_HOSTS``, ``SM_CURRENT_HOST``: only the chief (the first host, task 0 in ``TF_CONFIG``)
  writes into the model folder; the others' logs go to ``SM_OUTPUT_DATA_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detkit.config import GROUPS, repo_root
from detkit.train import checkpoints as CK

SAGEMAKER_BASE = "/opt/ml"
BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
CHECKPOINTS = "checkpoints"  # under the base: the local path of the job's CheckpointConfig
ENTRY_POINT = "sagemaker_entry.py"  # sagemaker_program, at the top of sourcedir.tar.gz
TRAIN_GROUPS = ("model", "train")  # the config the trained weights depend on (detkit.train.checkpoints)
# The toolkit passes hyperparameters to the program through /bin/sh without quoting them.
SHELL_SPECIAL = set("'\"`$\\;&|<>(){}*?\n")


class ContractError(ValueError):
    """The job's environment or hyperparameters are not what the runner sent: names what is missing."""


# ---------------------------------------------------------------------------- both sides


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    """Nested mappings -> ``{"a.b": value}``; lists stay whole (one Hydra value each)."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def hyperparameters(cfg) -> dict[str, str]:
    """The config the job trains with, as SageMaker hyperparameters: flattened keys, JSON values.

    ``model.*`` and ``train.*`` in full, and ``dataset.name`` (the MLflow tag); the job's own
    ``params.yaml`` supplies the rest, which training does not read.
    """
    values = {"dataset.name": cfg.dataset.name}
    for group in TRAIN_GROUPS:
        values.update(_flatten(OmegaConf.to_container(cfg[group], resolve=True), f"{group}."))
    for key, value in values.items():
        # The toolkit's own rendering of a value on the command line: str(), None as nothing.
        shown = "" if value is None else str(value)
        if SHELL_SPECIAL & set(shown):
            raise ContractError(f"{key}: {shown!r} holds characters that /bin/sh would interpret "
                                f"({''.join(sorted(SHELL_SPECIAL & set(shown)))!r}): SageMaker's TensorFlow "
                                "toolkit passes every hyperparameter to the program unquoted")
    return {key: json.dumps(value) for key, value in values.items()}


def _hydra_value(value: Any) -> str:
    """A decoded JSON value in Hydra's override grammar (strings quoted, so 'true' stays a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        quote = "'" if "'" not in value else '"'
        if quote in value or "\\" in value:
            raise ContractError(f"hyperparameter value {value!r}: quotes and backslashes are not supported")
        return f"{quote}{value}{quote}"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    raise ContractError(f"hyperparameter value {value!r}: expected a JSON scalar or list")


def overrides(values: Mapping[str, Any]) -> list[str]:
    """Decoded hyperparameters -> Hydra overrides; ``compute=local``: train here, in the job."""
    groups, keys = [], []
    for key, value in values.items():
        if key.startswith("sagemaker_"):  # the toolkit's own: program, code, region, distribution
            continue
        group, _, rest = key.partition(".")
        if rest == "name" and group in GROUPS:
            groups.append(f"{group}={value}")
        else:  # ++: set whether or not the group file spells the key out (the schema's default)
            keys.append(f"++{key}={_hydra_value(value)}")
    return [*groups, *keys, "compute=local"]


# ---------------------------------------------------------------------------- in the job


def _decode(raw: str) -> Any:
    """As the toolkit reads hyperparameters.json: a JSON document, else the string itself."""
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return raw


@dataclass
class JobContract:
    model_dir: Path
    inputs: dict[str, Path | None]  # records, pretrained (None without the channel)
    outputs: dict[str, Path]  # checkpoints, log, val_log: stages.train.run's outputs
    overrides: list[str]  # for load_config
    params: Path  # params.yaml in the code folder

    def publish(self, summary: dict[str, Any]) -> None:
        """Copy what ``models/checkpoints/`` holds after a local run into the model folder.

        ``final/``, ``checkpoint.json`` and the checkpoint it names, ``best.json`` + ``best/`` when
        present; the logs are already there. So ``model.tar.gz`` is the local layout plus the two
        logs, and a later local run can resume from it. The checkpoint folder itself stays: SageMaker
        keeps syncing it to S3 for the next attempt.
        """
        if not summary["chief"]:  # the chief's copy is the one that counts
            return
        source = self.outputs["checkpoints"]
        index = CK.latest(source)
        if index is None or not (source / CK.FINAL).is_dir():
            raise ContractError(f"{source}: no {CK.INDEX} naming a complete checkpoint, or no {CK.FINAL}/: "
                                "the training did not finish")
        for name in (CK.FINAL, index["latest"], CK.BEST):
            if (source / name).is_dir():
                shutil.copytree(source / name, self.model_dir / name, dirs_exist_ok=True)
        for name in (CK.INDEX, CK.BEST_INDEX):
            if (source / name).is_file():
                shutil.copy2(source / name, self.model_dir / name)
        print(f"train: published {', '.join(sorted(p.name for p in self.model_dir.iterdir()))} in {self.model_dir}")


def from_environment(environ: Mapping[str, str] = os.environ) -> JobContract | None:
    """The contract of the SageMaker job this process runs in; None outside one."""
    if "SM_MODEL_DIR" not in environ:
        return None
    base = Path(environ.get(BASE_DIR_ENV, SAGEMAKER_BASE))
    hp_file = base / "input" / "config" / "hyperparameters.json"
    try:
        raw = json.loads(hp_file.read_text())
    except (OSError, ValueError) as exc:
        raise ContractError(f"{hp_file}: cannot read the job's hyperparameters ({exc})") from exc
    if "SM_CHANNEL_RECORDS" not in environ:
        raise ContractError("SM_CHANNEL_RECORDS is not set: the job has no 'records' channel")
    model_dir = Path(environ["SM_MODEL_DIR"])
    current = environ.get("SM_CURRENT_HOST", "algo-1")
    hosts = json.loads(environ.get("SM_HOSTS") or json.dumps([current]))
    logs = model_dir if current == hosts[0] else Path(environ.get("SM_OUTPUT_DATA_DIR",
                                                                  base / "output" / "data"))
    pretrained = environ.get("SM_CHANNEL_PRETRAINED")
    return JobContract(
        model_dir=model_dir,
        inputs={"records": Path(environ["SM_CHANNEL_RECORDS"]), "pretrained": Path(pretrained) if pretrained else None},
        outputs={"checkpoints": base / CHECKPOINTS, "log": logs / CK.TRAIN_LOG, "val_log": logs / CK.VAL_LOG},
        overrides=overrides({key: _decode(value) for key, value in raw.items()}),
        params=repo_root() / "params.yaml",
    )
