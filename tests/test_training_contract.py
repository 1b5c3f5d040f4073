"""detkit.cloud.training_contract: the train stage inside a SageMaker Training job, run here under a
simulated job: the /opt/ml tree and SM_* variables as SageMaker's TensorFlow toolkit provides them,
with the hyperparameters of the very request detkit.cloud.training_job sends. The job's root
folder moves into tmp through the toolkit's own SAGEMAKER_BASE_DIR."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from detkit.cloud import training_contract as T
from detkit.cloud.training_job import job_request
from detkit.config import load_config
from detkit.models import family as F
from detkit.train import checkpoints as CK
from detkit.train.optimizer import make_optimizer, make_schedule
from harness.repo_copy import REPO_ROOT, activated_env
from tests import training_state

QUICK = ["dataset=sample", "model=retinanet_tiny", "train.steps=6", "train.batch_size=4", "train.checkpoint_every=3",
         "train.warmup_steps=0"]


def job_config(*overrides: str):
    return load_config(overrides=[*QUICK, "compute=sagemaker", "compute.bucket=bucket", *overrides])


def job_environment(base: Path, cfg, records: Path, host: str = "algo-1", hosts: tuple[str, ...] = ("algo-1",)):
    """SageMaker's layout under ``base`` (``/opt/ml`` in a job) for the job the runner would create
    for ``cfg``: hyperparameters.json, the records channel's copy, an empty model folder; and the
    SM_* variables. The checkpoint folder is left as it is (SageMaker restores it from S3)."""
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    request = job_request(cfg, "job", "0" * 16, {"records": "s3://bucket/records/"}, "s3://bucket/sourcedir.tar.gz",
                          "run-id")
    (config / "hyperparameters.json").write_text(json.dumps(request["HyperParameters"]))
    channel = base / "input" / "data" / "records"
    if not channel.is_dir():
        shutil.copytree(records, channel)
    shutil.rmtree(base / "model", ignore_errors=True)
    (base / "model").mkdir()
    (base / "output" / "data").mkdir(parents=True, exist_ok=True)
    return {"SAGEMAKER_BASE_DIR": str(base), "SM_MODEL_DIR": str(base / "model"), "SM_CHANNEL_RECORDS": str(channel),
            "SM_HOSTS": json.dumps(list(hosts)), "SM_CURRENT_HOST": host,
            "SM_OUTPUT_DATA_DIR": str(base / "output" / "data")}


def run_in_job(environment: dict[str, str], command: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=activated_env(**environment), capture_output=True, text=True,
                          timeout=600)


# ---------------------------------------------------------------------------- no TensorFlow


def test_outside_a_job_there_is_no_contract():
    assert T.from_environment({"HOME": "/root"}) is None


@pytest.mark.parametrize("overrides", [[], QUICK + ["train.clipnorm=null", "train.mixed_precision='true'"]])
def test_hyperparameters_rebuild_the_same_train_config_in_the_job(overrides):
    cfg = load_config(overrides=[*overrides, "compute=sagemaker"])
    sent = T.hyperparameters(cfg)
    assert all(isinstance(value, str) for value in sent.values())  # SageMaker takes strings only
    rebuilt = T.overrides({key: json.loads(value) for key, value in sent.items()})
    assert rebuilt[-1] == "compute=local"  # the job trains in place instead of starting another job
    job = load_config(overrides=rebuilt)
    for group in T.TRAIN_GROUPS:
        assert OmegaConf.to_container(job[group]) == OmegaConf.to_container(cfg[group]), group
    assert (job.dataset.name, job.compute.name) == (cfg.dataset.name, "local")


def test_a_value_the_toolkits_shell_would_mangle_is_refused_by_name():
    cfg = load_config(overrides=["model.pretrained='kaggle://keras/x;rm'", "compute=sagemaker"])
    with pytest.raises(T.ContractError, match=r"model.pretrained: .*/bin/sh"):
        T.hyperparameters(cfg)


def test_a_worker_that_is_not_the_chief_publishes_nothing(tmp_path, sample_records):
    environment = job_environment(tmp_path / "ml", job_config(), sample_records, host="algo-2",
                                  hosts=("algo-1", "algo-2"))
    contract = T.from_environment(environment)
    assert contract.outputs["log"].parent == tmp_path / "ml" / "output" / "data"  # not in the model
    contract.publish({"chief": False})
    assert list(contract.model_dir.iterdir()) == []


def test_a_job_without_the_records_channel_says_so(tmp_path, sample_records):
    environment = job_environment(tmp_path / "ml", job_config(), sample_records)
    del environment["SM_CHANNEL_RECORDS"]
    with pytest.raises(T.ContractError, match="SM_CHANNEL_RECORDS"):
        T.from_environment(environment)


# ---------------------------------------------------------------------------- the train stage in a job


@pytest.mark.slow
def test_the_train_stage_in_a_job_publishes_the_local_layout_and_resumes_after_an_interruption(
        tmp_path, sample_records):
    base = tmp_path / "opt" / "ml"
    cfg = job_config()
    environment = job_environment(base, cfg, sample_records)
    first = run_in_job(environment, [sys.executable, "-m", "stages.train"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    model, synced = base / "model", base / T.CHECKPOINTS
    assert sorted(p.name for p in model.iterdir()) == [CK.INDEX, "ckpt-0000006", CK.FINAL, CK.TRAIN_LOG, CK.VAL_LOG]
    assert sorted(p.name for p in synced.iterdir()) == [CK.INDEX, "ckpt-0000003", "ckpt-0000006", CK.FINAL]
    assert json.loads((model / CK.FINAL / "detkit.json").read_text())["step"] == 6
    assert [row["step"] for row in CK.read_log(model / CK.TRAIN_LOG)] == [1, 2, 3, 4, 5, 6]
    assert "resuming" not in first.stdout

    # A spot interruption after the last checkpoint, before final/ was written: SageMaker restarts the job
    # with the checkpoint folder as it was last synced (ckpt-0000006 the newest) and a fresh model folder.
    # The job resumes at step 6 of 6 and trains no further: the model it publishes must hold exactly the
    # checkpoint's weights (read here with Keras' own load_weights, not the train stage's restore).
    published_log = (model / CK.TRAIN_LOG).read_bytes()
    shutil.rmtree(synced / CK.FINAL)
    environment = job_environment(base, cfg, sample_records)
    second = run_in_job(environment, [sys.executable, "-m", "stages.train"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"train: resuming from {synced / 'ckpt-0000006'} (step 6 of 6)" in second.stdout
    assert sorted(p.name for p in model.iterdir()) == [CK.INDEX, "ckpt-0000006", CK.FINAL, CK.TRAIN_LOG, CK.VAL_LOG]
    assert (model / CK.TRAIN_LOG).read_bytes() == published_log
    assert [row["step"] for row in CK.read_log(model / CK.TRAIN_LOG)] == [1, 2, 3, 4, 5, 6]
    _, final, _ = F.load_trained(model / CK.FINAL)
    checkpoint = F.build(cfg.model, 37, None).model
    # The file holds the optimizer's slots too: load them into an optimizer of the same kind and schedule.
    F.family(cfg.model.family).compile(checkpoint, make_optimizer(cfg.train, make_schedule(cfg.train)),
                                       cfg.train, False)
    checkpoint.optimizer.build(checkpoint.trainable_variables)
    checkpoint.load_weights(synced / "ckpt-0000006" / CK.WEIGHTS)
    assert int(checkpoint.optimizer.iterations.numpy()) == 6
    names = [f"{index:04d} {weight.path}" for index, weight in enumerate(final.weights)]
    assert len(names) == len(checkpoint.weights)
    assert training_state.differences(dict(zip(names, (w.numpy() for w in final.weights))),
                                      dict(zip(names, (w.numpy() for w in checkpoint.weights)))) == []
    assert not list(tmp_path.rglob(CK.RUN_FILE))  # nothing tracked in the job: the runner tracks
