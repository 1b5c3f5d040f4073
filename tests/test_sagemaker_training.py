"""detkit.cloud.training_job (`compute: sagemaker`) against moto's server on 127.0.0.1.

moto completes a training job the moment it is created and never runs it, so each job's
model.tar.gz is made beforehand the way the job makes it: the code archive the runner uploads,
extracted as SageMaker's toolkit extracts it, its entry point run under the simulated training
contract of tests/test_training_contract.py, and the model folder tarred; then it is put where
SageMaker writes it (``<S3OutputPath>/<job name>/output/model.tar.gz``), and what that run printed
is put into moto's CloudWatch Logs as SageMaker's log agent sends a job's output. moto's jobs never
fail or train for a while: a job that fails goes through the module's one seam, ``JobWatcher``,
subclassed here, and a job still running is one whose status is set in moto's own backend (the
server runs in this process). moto has no ``stop_training_job``: that request is captured at the
botocore client, as sent, and given SageMaker's answer there."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from botocore.awsrequest import AWSResponse

from detkit.cloud import aws
from detkit.cloud import training_contract as T
from detkit.cloud import training_job as S
from detkit.config import ConfigError, load_config
from detkit.train import checkpoints as CK
from detkit.train import progress
from harness.repo_copy import REPO_ROOT, run
from tests.moto_server import moto_server
from tests.test_dvc_pipeline import quick_copy
from tests.test_training_contract import QUICK, job_environment, run_in_job

ROLE = "arn:aws:iam::123456789012:role/sagemaker-training"
REGION = "us-east-1"
BUCKET = "pets-training"
PREFIX = "pet-object-detection"  # conf/compute/sagemaker.yaml
GPU_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/tensorflow-training:2.21.0-gpu-py312-cu129-amzn2023-sagemaker"


@pytest.fixture(scope="module")
def moto_url():
    with moto_server({"AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "SAGEMAKER_ROLE_ARN": ROLE,
                      "SAGEMAKER_BUCKET": BUCKET}) as url:
        yield url


@pytest.fixture
def aws_clients(moto_url, tmp_path, monkeypatch):
    """A fresh moto with the bucket; in-process MLflow runs go to tmp, not the repository's store."""
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    s3, sagemaker = aws.clients(REGION, "s3", "sagemaker")
    s3.create_bucket(Bucket=BUCKET)
    return s3, sagemaker


def job_artifact(root: Path, cfg, records: Path, scratch: Path) -> tuple[bytes, list[str]]:
    """model.tar.gz of the job the runner starts for ``cfg`` from the repository at ``root``, and the
    lines the job's training printed (the docker log driver splits at newlines only)."""
    base = scratch / "opt" / "ml"
    code = base / "code"
    with tarfile.open(fileobj=io.BytesIO(S.source_archive(root))) as tar:
        tar.extractall(code, filter="data")
    result = run_in_job(job_environment(base, cfg, records), [sys.executable, T.ENTRY_POINT], cwd=code)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:  # SageMaker tars the model folder's contents
        for path in sorted((base / "model").iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue(), [line for line in (result.stdout + result.stderr).split("\n") if line]


def log_job_output(name: str, lines: list[str], stream: str = "algo-1-1700000000") -> None:
    """``lines`` into the job's log stream ``<job name>/<stream>``, one event each, as SageMaker sends them."""
    (logs,) = aws.clients(REGION, "logs")
    if not logs.describe_log_groups(logGroupNamePrefix=S.LOG_GROUP)["logGroups"]:
        logs.create_log_group(logGroupName=S.LOG_GROUP)
    full = f"{name}/{stream}"
    if not logs.describe_log_streams(logGroupName=S.LOG_GROUP, logStreamNamePrefix=full)["logStreams"]:
        logs.create_log_stream(logGroupName=S.LOG_GROUP, logStreamName=full)
    if lines:
        now = int(time.time() * 1000)
        logs.put_log_events(logGroupName=S.LOG_GROUP, logStreamName=full,
                            logEvents=[{"timestamp": now, "message": line} for line in lines])


def put_artifact(s3, cfg, fp: str, data: bytes) -> str:
    name = S.job_name(cfg.compute, fp, 1)
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/jobs/{name}/output/model.tar.gz", Body=data)
    return name


def on_client_events(monkeypatch, handlers: dict[str, Callable]) -> None:
    """Register botocore event ``handlers`` on every session the code under test makes its clients from."""

    def session(region, made=aws.session):
        new = made(region)
        for event, handler in handlers.items():
            new.events.register(event, handler)
        return new

    monkeypatch.setattr(aws, "session", session)


class Body:
    """An HTTP response body as botocore reads it."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def moto_training_job(name: str):
    """The job in moto's backend (its server runs in this process), whose status a test may set."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION].training_jobs[name]


def first_job_name(cfg, fp: str) -> str:
    """``<compute.base_job_name>-<fingerprint[:12]>-1``: attempt 1 of this training."""
    return f"{cfg.compute.base_job_name}-{fp[:12]}-1"


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- without a job


def test_default_image_is_the_aws_tensorflow_image_of_the_pinned_version():
    cfg = load_config(overrides=["compute=sagemaker"])
    assert S.training_image(cfg.compute) == GPU_IMAGE
    cpu = load_config(overrides=["compute=sagemaker", "compute.instance_type=ml.m5.xlarge",
                                 "compute.region=eu-south-1"]).compute
    assert S.training_image(cpu) == ("692866216735.dkr.ecr.eu-south-1.amazonaws.com/tensorflow-training:"
                                     "2.21.0-cpu-py312-amzn2023-sagemaker")
    pins = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert all(f"tensorflow=={tag.split('-')[0]}" in pins for tag in S.DLC_TAGS.values())


def test_code_archive_holds_the_entry_point_and_pinned_job_requirements_and_is_reproducible():
    data = S.source_archive(REPO_ROOT)
    assert data == S.source_archive(REPO_ROOT)  # same files, same key in S3: uploaded once
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        requirements = tar.extractfile("requirements.txt").read().decode().splitlines()
    assert {T.ENTRY_POINT, "requirements.txt", "params.yaml", "stages/train.py", "detkit/cloud/training_contract.py",
            "conf/compute/sagemaker.yaml"} <= set(names)
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    pins = set((REPO_ROOT / "requirements.txt").read_text().splitlines())
    assert requirements and set(requirements) <= pins and "tensorflow==2.21.0" in requirements


def test_cost_is_printed_as_an_upper_bound():
    on_demand = load_config(overrides=["compute=sagemaker", "compute.spot=false", "compute.max_run_minutes=90"])
    assert "at most $2.11 (1 x ml.g5.xlarge at $1.408/hour" in S.cost_line(on_demand.compute)
    spot = load_config(overrides=["compute=sagemaker", "compute.instance_count=2"]).compute
    line = S.cost_line(spot)
    assert "at most $33.79 (2 x ml.g5.xlarge" in line and "spot" in line


def test_spot_wait_shorter_than_the_run_is_refused():
    with pytest.raises(ConfigError, match="max_wait_minutes .* must be at least max_run_minutes"):
        load_config(overrides=["compute=sagemaker", "compute.max_wait_minutes=60"])


def test_without_a_role_the_stage_says_how_to_set_it(aws_clients, monkeypatch, sample_records, tmp_path):
    monkeypatch.delenv("SAGEMAKER_ROLE_ARN")
    cfg = load_config(overrides=[*QUICK, "compute=sagemaker"])
    with pytest.raises(ConfigError, match="export SAGEMAKER_ROLE_ARN="):
        S.run(cfg, {"records": sample_records}, outputs(tmp_path))
    assert aws_clients[1].list_training_jobs()["TrainingJobSummaries"] == []


def test_mixed_precision_a_family_cannot_train_in_is_refused_before_any_job(aws_clients, sample_records, tmp_path):
    cfg = load_config(overrides=[*QUICK, "compute=sagemaker", "model=dfine_tiny", "train.mixed_precision=true"])
    with pytest.raises(ConfigError, match="^train.mixed_precision: true, but the dfine family trains in float32"):
        S.run(cfg, {"records": sample_records}, outputs(tmp_path))
    assert aws_clients[1].list_training_jobs()["TrainingJobSummaries"] == []
    assert aws_clients[0].list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0  # nothing uploaded
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------- dvc exp run


@pytest.mark.slow
def test_dvc_exp_run_trains_on_sagemaker_uploads_records_once_and_eval_runs_on_what_lands(aws_clients, tmp_path,
                                                                                          monkeypatch):
    s3, sagemaker = aws_clients
    repo = quick_copy(tmp_path / "repo")
    run(["dvc", "repro", "tfrecord"], repo)
    records = repo / "data" / "records"
    cfg = load_config(repo / "params.yaml", overrides=["compute=sagemaker"])  # what the experiment composes
    fp = CK.fingerprint(cfg, records, None)
    artifact, printed = job_artifact(repo, cfg, records, tmp_path / "job1")
    name = put_artifact(s3, cfg, fp, artifact)
    log_job_output(name, printed)

    first = run(["dvc", "exp", "run", "-n", "on-sagemaker", "-S", "compute=sagemaker", "eval"], repo)
    out = first.stdout
    assert "train: uploaded data/records (" in out and "train: uploaded the code" in out, out
    assert "train: cost: at most $16.90" in out and f"train: started job {name} on 1 x ml.g5.xlarge (spot)" in out
    # What the job printed, from its logs, before its last status: its own lines, of its step lines the last.
    waited = out[out.index("train: started job"):out.index(f"train: job {name}: Completed")].splitlines()
    steps = [parsed for parsed in map(progress.parse, waited) if parsed]
    assert "train: 6 steps (from 0) in " in out and steps and steps[-1]["step"] == 6, waited
    job = sagemaker.describe_training_job(TrainingJobName=name)
    assert job["AlgorithmSpecification"]["TrainingImage"] == GPU_IMAGE
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert job["RoleArn"] == ROLE
    assert job["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50}
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 720 * 60, "MaxWaitTimeInSeconds": 1440 * 60}
    assert job["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/{PREFIX}/checkpoints/{fp}/",
                                       "LocalPath": "/opt/ml/checkpoints"}
    assert {"Key": "project", "Value": "pet-object-detection"} in \
        sagemaker.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]
    (channel,) = job["InputDataConfig"]  # no pretrained channel: the tiny model trains from scratch
    records_uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
    assert channel["ChannelName"] == "records" and records_uri.startswith(f"s3://{BUCKET}/{PREFIX}/inputs/records/")
    _, records_key = aws.split_s3_uri(records_uri)
    uploaded = {o["Key"][len(records_key):] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=records_key)["Contents"]}
    assert uploaded == {p.name for p in records.iterdir()}
    hps = {key: json.loads(value) for key, value in job["HyperParameters"].items()}
    assert (hps["model.name"], hps["dataset.name"], hps["train.steps"]) == ("retinanet_tiny", "sample", 6)
    assert hps["sagemaker_program"] == T.ENTRY_POINT and "sagemaker_multi_worker_mirrored_strategy_enabled" not in hps
    code_bucket, code_key = aws.split_s3_uri(hps["sagemaker_submit_directory"])
    assert s3.get_object(Bucket=code_bucket, Key=code_key)["Body"].read() == S.source_archive(repo)

    # Landed: the local layout, the job's own log, and eval ran on it.
    checkpoints = repo / "models" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [CK.INDEX, "ckpt-0000006", CK.FINAL, CK.RUN_FILE]
    with tarfile.open(fileobj=io.BytesIO(artifact)) as tar:
        assert (repo / "plots" / "train_log.csv").read_bytes() == tar.extractfile(CK.TRAIN_LOG).read()
    assert json.loads((repo / "metrics" / "eval.json").read_text())["step"] == 6
    from mlflow.tracking import MlflowClient

    run_file = json.loads((checkpoints / CK.RUN_FILE).read_text())
    tracked = MlflowClient(run_file["tracking_uri"])
    mlflow_run = tracked.get_run(run_file["run_id"])
    assert mlflow_run.data.tags["sagemaker_job_name"] == name and mlflow_run.info.status == "FINISHED"
    assert sorted(m.step for m in tracked.get_metric_history(run_file["run_id"], "loss")) == [1, 2, 3, 4, 5, 6]

    # Another train param, the same records: a new job, no records uploaded.
    # It evaluates every 3 steps: its val lines come through the logs.
    cfg2 = load_config(repo / "params.yaml", overrides=["train.learning_rate=0.004", "train.eval_every=3"])
    fp2 = CK.fingerprint(cfg2, records, None)
    artifact2, printed2 = job_artifact(repo, cfg2, records, tmp_path / "job2")
    name2 = put_artifact(s3, cfg2, fp2, artifact2)
    log_job_output(name2, printed2)
    second = run(["dvc", "exp", "run", "-n", "lr-on-sagemaker", "-S", "compute=sagemaker",
                  "-S", "train.learning_rate=0.004", "-S", "train.eval_every=3", "eval"], repo)
    assert "train: data/records is already in " in second.stdout and "uploaded data/records" not in second.stdout
    assert re.search(r"^train: step 3: val AP [0-9.]+  AP50 [0-9.]+", second.stdout, re.M), second.stdout
    assert f"train: started job {name2} " in second.stdout
    job2 = sagemaker.describe_training_job(TrainingJobName=name2)
    assert job2["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == records_uri

    # The first params again, outside DVC: the Completed job's model is reused, no job starts.
    reused = S.run(cfg, {"records": records}, outputs(tmp_path / "again"))
    assert reused["reused"] and reused["job_name"] == name
    assert len(sagemaker.list_training_jobs()["TrainingJobSummaries"]) == 2
    assert (tmp_path / "again" / "checkpoints" / CK.FINAL / "detkit.json").is_file()

    # Its model deleted from S3: a new attempt of the same training (same checkpoint folder).
    s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/jobs/{name}/output/model.tar.gz")
    name_2 = S.job_name(cfg.compute, fp, 2)
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/jobs/{name_2}/output/model.tar.gz", Body=artifact)
    # moto describes a job with MetricDefinitions of its own: what is sent is read off the request.
    sent = []
    on_client_events(monkeypatch, {"provide-client-params.sagemaker.CreateTrainingJob":
                                   lambda params, **_: sent.append(params)})
    retrained = S.run(cfg, {"records": records}, outputs(tmp_path / "again"))
    assert not retrained["reused"] and retrained["job_name"] == name_2
    assert sagemaker.describe_training_job(TrainingJobName=name_2)["CheckpointConfig"] == job["CheckpointConfig"]
    # What SageMaker charts from those definitions and a job's log lines: the stage's own logs.
    (request,) = sent
    log = "\n".join(printed2)
    charted = {d["Name"]: re.findall(d["Regex"], log) for d in request["AlgorithmSpecification"]["MetricDefinitions"]}
    with tarfile.open(fileobj=io.BytesIO(artifact2)) as tar:
        rows = list(csv.DictReader(io.TextIOWrapper(tar.extractfile(CK.TRAIN_LOG))))
        val_rows = list(csv.DictReader(io.TextIOWrapper(tar.extractfile(CK.VAL_LOG))))
    assert charted["val:AP"] == [f"{float(r['AP']):.3f}" for r in val_rows] and len(val_rows) == 2
    assert charted["val:AP50"] == [f"{float(r['AP50']):.3f}" for r in val_rows]
    assert charted["train:loss"] == [f"{float(r['loss']):.4f}" for r in rows] and rows


# ---------------------------------------------------------------------------- through the seam


def outputs(root: Path) -> dict[str, Path]:
    return {"checkpoints": root / "checkpoints", "log": root / "train_log.csv", "val_log": root / "val_log.csv"}


def previous_outputs(root: Path) -> dict[str, Path]:
    """What an earlier run left: a model and its logs."""
    paths = outputs(root)
    (paths["checkpoints"] / CK.FINAL).mkdir(parents=True)
    (paths["checkpoints"] / CK.FINAL / "detkit.json").write_text('{"step": 1000}')
    (paths["checkpoints"] / CK.INDEX).write_text('{"latest": "ckpt-0001000"}')
    paths["log"].write_text("step,loss\n1000,0.1\n")
    paths["val_log"].write_text("step,AP\n")
    return paths


class FailingWatcher(S.JobWatcher):
    """The job trains for one poll per batch in ``logged``, logging it, then ends Failed, as one whose
    training script raised."""

    logged: tuple[list[str], ...] = ()

    def __init__(self, *args):
        super().__init__(*args)
        self.polls = 0

    def describe(self, name):
        description = super().describe(name)
        if self.polls < len(self.logged):
            log_job_output(name, self.logged[self.polls])
            self.polls += 1
            return {**description, "TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"}
        return {**description, "TrainingJobStatus": "Failed", "SecondaryStatus": "Failed",
                "FailureReason": "AlgorithmError: ExecuteUserScriptError: ResourceExhaustedError: OOM"}


def stage_logs() -> tuple[list[str], ...]:
    """Three polls' worth of what the train stage logs in a job, resumed at step 300 of 1000: its own
    lines (a step line per stop: without a terminal it draws no bar) and TensorFlow's."""

    def steps(first: int, last: int, loss: float) -> str:
        return "\n".join(progress.STEP.format(step=step, steps=1000, loss=loss, learning_rate=1e-3)
                         for step in range(first, last + 1, 100))

    return ([f"train: resuming from {T.SAGEMAKER_BASE}/{T.CHECKPOINTS}/ckpt-0000300 (step 300 of 1000)",
             "W0000 00:00:00.000000 42 cuda_dnn.cc:8579] a TensorFlow warning",
             steps(400, 500, 0.734), "train: step 500: val AP 0.412  AP50 0.733  (best so far)",
             steps(600, 600, 0.701)],
            [steps(700, 800, 0.65)],
            ["train: step 800: val AP 0.398  AP50 0.720"])


class TrainingWatcher(FailingWatcher):
    logged = stage_logs()


def test_a_failed_job_fails_with_its_reason_and_leaves_the_previous_model(aws_clients, sample_records, tmp_path,
                                                                          capsys):
    cfg = load_config(overrides=[*QUICK, "compute=sagemaker"])
    paths = previous_outputs(tmp_path / "previous")
    before = tree_digest(tmp_path / "previous")
    with pytest.raises(S.TrainingJobError, match=r"ended Failed: AlgorithmError: .*OOM\. .* is unchanged"):
        S.run(cfg, {"records": sample_records}, paths, watcher=FailingWatcher)
    assert tree_digest(tmp_path / "previous") == before
    name = S.job_name(cfg.compute, CK.fingerprint(cfg, sample_records, None), 1)
    assert f"train: job {name}: Failed" in capsys.readouterr().out
    from mlflow.tracking import MlflowClient

    (run_info,) = MlflowClient().search_runs(MlflowClient().search_experiments()[0].experiment_id)
    assert run_info.info.status == "FAILED" and run_info.data.tags["sagemaker_job_name"] == name


def test_while_waiting_the_stage_prints_the_jobs_status_and_its_own_lines_from_the_logs(aws_clients, sample_records,
                                                                                     tmp_path, capsys):
    cfg = load_config(overrides=[*QUICK, "compute=sagemaker", "compute.poll_seconds=1"])
    with pytest.raises(S.TrainingJobError, match="ended Failed"):
        S.run(cfg, {"records": sample_records}, outputs(tmp_path), watcher=TrainingWatcher)
    name = S.job_name(cfg.compute, CK.fingerprint(cfg, sample_records, None), 1)
    out = capsys.readouterr().out
    waited = out[out.index("train: started job"):].splitlines()[1:]
    expected = [f"train: job {name}: Training",  # the first poll: no logs yet
                f"train: resuming from {T.SAGEMAKER_BASE}/{T.CHECKPOINTS}/ckpt-0000300 (step 300 of 1000)",
                "train: step 500: val AP 0.412  AP50 0.733  (best so far)",
                "train: step 600/1000: loss 0.7010, lr 1.000e-03",  # of 400, 500 and 600: the newest
                "train: step 800/1000: loss 0.6500, lr 1.000e-03",
                "train: step 800: val AP 0.398  AP50 0.720",
                f"train: job {name}: Failed"]
    assert waited == expected


def test_ctrl_c_while_waiting_stops_the_job_and_leaves_the_previous_model(aws_clients, moto_url, sample_records,
                                                                         tmp_path, capsys, monkeypatch):
    cfg = load_config(overrides=[*QUICK, "compute=sagemaker"])
    paths = previous_outputs(tmp_path / "previous")
    before = tree_digest(tmp_path / "previous")
    stops = []

    def ctrl_c(**_):  # pressed while the stage asks SageMaker for the job's status
        raise KeyboardInterrupt

    def answer_stop(request, **_):  # moto has none: keep the request as sent, answer as SageMaker does
        stops.append(request)
        return AWSResponse(request.url, 200, {"Content-Type": "application/x-amz-json-1.1"}, Body(b"{}"))

    on_client_events(monkeypatch, {"before-call.sagemaker.DescribeTrainingJob": ctrl_c,
                                   "before-send.sagemaker.StopTrainingJob": answer_stop})
    with pytest.raises(KeyboardInterrupt):
        S.run(cfg, {"records": sample_records}, paths)
    name = first_job_name(cfg, CK.fingerprint(cfg, sample_records, None))
    (stop,) = stops
    target = stop.headers["X-Amz-Target"]
    assert (target.decode() if isinstance(target, bytes) else target) == "SageMaker.StopTrainingJob"
    assert json.loads(stop.body) == {"TrainingJobName": name} and stop.url.startswith(moto_url)
    assert f"train: stop requested for job {name}" in capsys.readouterr().out
    assert tree_digest(tmp_path / "previous") == before
    assert not list((tmp_path / "previous").glob(".checkpoints.tmp-*"))


def published_model(fp: str) -> bytes:
    """A model.tar.gz in the layout a job publishes (detkit.cloud.training_contract): the two logs,
    the checkpoint index and the checkpoint it names, final/."""
    files = {CK.TRAIN_LOG: b"step,loss,box_loss,class_loss,learning_rate\n6,0.5,0.2,0.3,0.001\n",
             CK.VAL_LOG: b"step,AP,AP50,AP75\n",
             CK.INDEX: json.dumps({"latest": "ckpt-0000006", "step": 6, "fingerprint": fp}).encode(),
             "ckpt-0000006/state.json": json.dumps({"step": 6, "fingerprint": fp}).encode(),
             f"{CK.FINAL}/detkit.json": b'{"step": 6}'}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("running, secondary, ends", [("InProgress", "Training", "Completed"),
                                                      ("Stopping", "Stopping", "Stopped")])
def test_a_rerun_waits_for_the_attempt_still_running_for_the_same_training(running, secondary, ends, aws_clients,
                                                                           sample_records, tmp_path, capsys,
                                                                           monkeypatch):
    s3, sagemaker = aws_clients
    cfg = load_config(overrides=[*QUICK, "compute=sagemaker", "compute.poll_seconds=1"])
    fp = CK.fingerprint(cfg, sample_records, None)
    name = first_job_name(cfg, fp)
    # An earlier run started attempt 1 of this training (the request it sends), and the job still runs.
    sagemaker.create_training_job(**S.job_request(cfg, name, fp, {"records": f"s3://{BUCKET}/{PREFIX}/records/"},
                                                  f"s3://{BUCKET}/{PREFIX}/sourcedir.tar.gz", "earlier-run"))
    job = moto_training_job(name)
    job.training_job_status, job.secondary_status = running, secondary
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/jobs/{name}/output/model.tar.gz", Body=published_model(fp))
    created = []

    def ends_after_this_poll(**_):
        job.training_job_status = job.secondary_status = ends

    on_client_events(monkeypatch, {"provide-client-params.sagemaker.CreateTrainingJob":
                                   lambda params, **_: created.append(params),
                                   "after-call.sagemaker.DescribeTrainingJob": ends_after_this_poll})
    paths = previous_outputs(tmp_path / "previous")
    before = tree_digest(tmp_path / "previous")
    if ends == "Completed":
        summary = S.run(cfg, {"records": sample_records}, paths)
        assert summary["job_name"] == name and not summary["reused"]
        assert json.loads((paths["checkpoints"] / CK.FINAL / "detkit.json").read_text()) == {"step": 6}
        assert [row["step"] for row in CK.read_log(paths["log"])] == [6]
    else:
        with pytest.raises(S.TrainingJobError, match=f"job {name} ended Stopped"):
            S.run(cfg, {"records": sample_records}, paths)
        assert tree_digest(tmp_path / "previous") == before
    assert created == [] and [j["TrainingJobName"] for j in sagemaker.list_training_jobs()["TrainingJobSummaries"]] \
        == [name]  # no other attempt started
    out = capsys.readouterr().out
    assert (f"train: job {name} is already training these params and data ({running}): waiting for it\n"
            f"train: job {name}: {secondary}\ntrain: job {name}: {ends}\n") in out
