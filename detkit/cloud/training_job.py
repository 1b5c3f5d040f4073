"""The train stage as a SageMaker Training job (``compute: sagemaker``): the side that runs here.

``run(cfg, inputs, outputs)`` stands in for the local training and leaves the same outputs:

1. Uploads the inputs as the job's channels, content-addressed:
   ``s3://<bucket>/<prefix>/inputs/<channel>/<sha256>/`` for ``records`` (and ``pretrained`` with
   a pretrained ``model.pretrained``), the sha256 over the folder's file names and bytes; and the code the job
   runs, ``s3://<bucket>/<prefix>/code/<sha256>/sourcedir.tar.gz`` (``detkit/``, ``stages/``,
   ``conf/``, ``params.yaml``, the entry point and a ``requirements.txt`` of what the image lacks).
   What is already there (a folder's ``<sha256>.json`` marker is written after its last file) is
   not uploaded again.
2. Names the job after the training fingerprint (``detkit.train.checkpoints.fingerprint``):
   ``<base_job_name>-<fingerprint[:12]>-<attempt>`` (``job_name``). All attempts of one fingerprint
   share ``s3://<bucket>/<prefix>/checkpoints/<fingerprint>/``, which SageMaker restores into the
   job's checkpoint folder when it (re)starts and syncs back while it runs: a spot interruption or
   a new attempt resumes from the newest checkpoint. The newest attempt decides what happens:
   Completed: its model is reused and no job starts (the weights depend on the fingerprint
   only), unless that model.tar.gz is gone from S3; InProgress or Stopping: it is waited for;
   none, Failed or Stopped: a new attempt.
3. Creates the job (AWS's TensorFlow training image, ``training_image``) after printing the
   most it can cost, with ``METRIC_DEFINITIONS`` so that SageMaker charts val AP, AP50 and the loss
   from the stage's lines. Then, until it ends, prints its status changes and what the train stage
   in it prints (``train: ...`` lines, read from its CloudWatch Logs; of the progress bar, its
   newest state). Ctrl-C asks SageMaker to stop it.
4. On Completed, downloads ``model.tar.gz`` (written by ``detkit.cloud.training_contract`` in the job),
   extracts it next to ``outputs["checkpoints"]`` and swaps it in whole: ``models/checkpoints/``
   is then exactly what a local run leaves (``final/``, ``checkpoint.json``, the newest
   ``ckpt-*``, ``best*`` with ``train.keep: best``, ``mlflow_run.json``), and the logs go to
   ``outputs["log"]`` and ``outputs["val_log"]``. On Failed or Stopped: ``TrainingJobError`` with
   SageMaker's reason, and the previous outputs are left as they were.

The MLflow run is made here, as for a local run (the job itself tracks nothing), tagged with the
job's name and ARN; the job gets its id as ``DETKIT_MLFLOW_RUN_ID``. After landing, the logs'
rows are logged to it and ``final/`` is its artifact.

``JobWatcher`` is the one seam around a running job (its status, its logs, stopping it): moto,
which the tests run against, completes a job when it is created, never logs, and has no
``stop_training_job``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from detkit.cloud import aws
from detkit.cloud.training_contract import CHECKPOINTS, ENTRY_POINT, SAGEMAKER_BASE, hyperparameters
from detkit.config import ConfigError, workspace_root
from detkit.core.fsio import atomic_dir, atomic_write_bytes
from detkit.train import checkpoints as CK
from detkit.train import distribute, progress

RUN_ID_ENV = "DETKIT_MLFLOW_RUN_ID"
ENDED = ("Completed", "Failed", "Stopped")
HEARTBEAT_SECONDS = 600  # a "still running" line this often when nothing else is printed
LOG_GROUP = "/aws/sagemaker/TrainingJobs"  # SageMaker's: one stream per instance and start, <job>/algo-<n>-<epoch>
CHIEF_HOST = "algo-1"  # the first instance: the chief, the one that draws the bar and evaluates
# What SageMaker charts from the job's log lines (one capture group each), derived from the formats
# the train loop prints (detkit.train.progress): its evaluation line and its step line's loss.
METRIC_DEFINITIONS = [
    {"Name": "val:AP", "Regex": progress.pattern(progress.VALIDATION, capture="AP")},
    {"Name": "val:AP50", "Regex": progress.pattern(progress.VALIDATION, capture="AP50")},
    {"Name": "train:loss", "Regex": progress.pattern(progress.STEP, capture="loss")},
]
# AWS Deep Learning Containers, TensorFlow 2.21.0 training for SageMaker (the pin in requirements.txt):
# tags and registry accounts as aws/deep-learning-containers documents them.
DLC_TAGS = {"gpu": "2.21.0-gpu-py312-cu129-amzn2023-sagemaker", "cpu": "2.21.0-cpu-py312-amzn2023-sagemaker"}
# What the train stage imports that the image lacks or has at another version, with their own
# dependencies that the image lacks, pinned as requirements.txt pins them. tensorflow is pinned to
# the image's version so that pip resolves the rest (tensorflow-text above all) against it rather
# than upgrading it (the CPU image's TensorFlow is the tensorflow-cpu distribution, so there pip adds
# tensorflow 2.21.0 next to it: tensorflow-text requires that name).
JOB_PACKAGES = ("tensorflow", "keras", "keras-hub", "tensorflow-text", "kagglehub", "sentencepiece", "tokenizers",
                "hydra-core", "omegaconf", "antlr4-python3-runtime", "faster-coco-eval", "pycocotools",
                "google-crc32c", "tqdm")
CODE = (("detkit", "*.py"), ("stages", "*.py"), ("conf", "*.yaml"))
ENTRY_SOURCE = Path("stages") / "sagemaker_entry.py"  # packed at the top of the code folder as ENTRY_POINT


class TrainingJobError(RuntimeError):
    """The job could not start or did not complete: SageMaker's reason, and what is left where."""


# ---------------------------------------------------------------------------- names and settings


def job_name(c, fp: str, attempt: int) -> str:
    """``<base_job_name>-<fingerprint[:12]>-<attempt>``: one name per attempt of one training."""
    return f"{_job_stem(c, fp)}{attempt}"


def _job_stem(c, fp: str) -> str:
    return f"{c.base_job_name}-{fp[:12]}-"


def checkpoint_uri(c, fp: str) -> str:
    return f"s3://{c.bucket}/{c.prefix}/checkpoints/{fp}/"


def output_path(c) -> str:
    """The job's S3OutputPath: SageMaker writes ``<it>/<job name>/output/model.tar.gz``."""
    return f"s3://{c.bucket}/{c.prefix}/jobs"


def training_image(c) -> str:
    """``compute.image``, or AWS's TensorFlow training image for the region, GPU for ml.g*/ml.p* types."""
    if c.image:
        return str(c.image)
    return aws.dlc_image(c.region, "tensorflow-training", DLC_TAGS[aws.device_of(c.instance_type)])


def cost_line(c) -> str:
    """The most the job can cost at on-demand prices: instances x hourly price x max_run_minutes."""
    hourly = c.hourly_usd.get(c.instance_type)
    if hourly is None:
        return (f"train: cost: {c.instance_type} is not in compute.hourly_usd; "
                "see https://aws.amazon.com/sagemaker/pricing/")
    most = hourly * c.instance_count * c.max_run_minutes / 60
    line = (f"train: cost: at most ${most:.2f} ({c.instance_count} x {c.instance_type} at ${hourly:.4g}/hour, "
            f"us-east-1 list price, for at most {c.max_run_minutes} min of training)")
    if c.spot:
        line += ("; managed spot bills that time at a discount (up to 90%, it varies), and the wait for capacity "
                 f"(up to {c.max_wait_minutes - c.max_run_minutes} min more) is not billed")
    return line


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(workspace_root()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------- uploads


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def upload_folder(s3, c, channel: str, folder: Path) -> str:
    """The folder under ``<prefix>/inputs/<channel>/<sha256>/`` (uploaded unless already there); its URI."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    if not files:
        raise TrainingJobError(f"{_shown(folder)}: no files for the '{channel}' channel; run its stage first")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + _file_sha256(path))
    key = f"{c.prefix}/inputs/{channel}/{digest.hexdigest()}"
    uri = f"s3://{c.bucket}/{key}/"
    if aws.unless_missing(s3.head_object, "404", Bucket=c.bucket, Key=f"{key}.json") is not None:
        print(f"train: {_shown(folder)} is already in {uri} (same files): not uploaded")
        return uri
    sizes = {path.relative_to(folder).as_posix(): path.stat().st_size for path in files}
    for path in files:
        s3.upload_file(str(path), c.bucket, f"{key}/{path.relative_to(folder).as_posix()}")
    # Written last: a prefix with its marker is complete.
    s3.put_object(Bucket=c.bucket, Key=f"{key}.json", Body=json.dumps({"files": sizes}, indent=1).encode())
    print(f"train: uploaded {_shown(folder)} ({len(files)} files, {sum(sizes.values()) / 1e6:.1f} MB) to {uri}")
    return uri


def job_requirements(root: Path) -> str:
    """requirements.txt for the job: ``JOB_PACKAGES`` with the versions ``root``'s requirements.txt pins."""
    pins = {}
    for line in (root / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    missing = [name for name in JOB_PACKAGES if name not in pins]
    if missing:
        raise TrainingJobError(f"{root / 'requirements.txt'}: no exact pin for {', '.join(missing)}, "
                               "which the training job installs")
    return "".join(f"{name}=={pins[name]}\n" for name in JOB_PACKAGES)


def source_archive(root: Path) -> bytes:
    """sourcedir.tar.gz: the code, config, entry point and job requirements; same files, same bytes."""
    members = {path.relative_to(root).as_posix(): path.read_bytes()
               for folder, pattern in CODE for path in sorted((root / folder).rglob(pattern))
               if "__pycache__" not in path.parts}
    members["params.yaml"] = (root / "params.yaml").read_bytes()
    members[ENTRY_POINT] = (root / ENTRY_SOURCE).read_bytes()
    members["requirements.txt"] = job_requirements(root).encode()
    buffer = io.BytesIO()
    # mtime=0 in the gzip header and every tar header: the archive depends on content only.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(members[name]), 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    return buffer.getvalue()


def upload_code(s3, c, root: Path) -> str:
    data = source_archive(root)
    key = f"{c.prefix}/code/{hashlib.sha256(data).hexdigest()}/sourcedir.tar.gz"
    uri = f"s3://{c.bucket}/{key}"
    if aws.put_once(s3, c.bucket, key, data):
        print(f"train: uploaded the code ({len(data) / 1e3:.0f} kB) to {uri}")
    else:
        print(f"train: the code is already in {uri}: not uploaded")
    return uri


# ---------------------------------------------------------------------------- the job


def job_request(cfg, name: str, fp: str, channels: dict[str, str], code_uri: str, run_id: str) -> dict[str, Any]:
    """``create_training_job``'s arguments."""
    c = cfg.compute
    hps = {**hyperparameters(cfg), "sagemaker_program": json.dumps(ENTRY_POINT),
           "sagemaker_submit_directory": json.dumps(code_uri), "sagemaker_region": json.dumps(c.region)}
    if c.instance_count > 1:  # the TensorFlow toolkit then writes TF_CONFIG naming every instance
        hps["sagemaker_multi_worker_mirrored_strategy_enabled"] = json.dumps(True)
    stopping = {"MaxRuntimeInSeconds": int(c.max_run_minutes) * 60}
    if c.spot:
        stopping["MaxWaitTimeInSeconds"] = int(c.max_wait_minutes) * 60
    return {
        "TrainingJobName": name,
        "RoleArn": c.role_arn,
        "AlgorithmSpecification": {"TrainingImage": training_image(c), "TrainingInputMode": "File",
                                   "MetricDefinitions": METRIC_DEFINITIONS},
        "HyperParameters": hps,
        "InputDataConfig": [{"ChannelName": channel, "InputMode": "File", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}
            for channel, uri in channels.items()],
        "OutputDataConfig": {"S3OutputPath": output_path(c)},
        "ResourceConfig": {"InstanceType": c.instance_type, "InstanceCount": int(c.instance_count),
                           "VolumeSizeInGB": int(c.volume_size_gb)},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": bool(c.spot),
        "CheckpointConfig": {"S3Uri": checkpoint_uri(c, fp), "LocalPath": f"{SAGEMAKER_BASE}/{CHECKPOINTS}"},
        "Environment": {RUN_ID_ENV: run_id},
        "Tags": aws.project_tags(c.project_tag),
    }


def newest_attempt(sagemaker, c, fp: str) -> tuple[int, dict[str, Any] | None]:
    """The highest attempt number of this fingerprint's jobs and its list entry; (0, None) if none."""
    stem = _job_stem(c, fp)
    pattern = re.compile(re.escape(stem) + r"(\d+)")
    found = [(int(match[1]), job)
             for page in sagemaker.get_paginator("list_training_jobs").paginate(NameContains=stem)
             for job in page["TrainingJobSummaries"] if (match := pattern.fullmatch(job["TrainingJobName"]))]
    return max(found, key=lambda item: item[0]) if found else (0, None)


class JobWatcher:
    """A running job's status, new log lines and stop: the calls moto cannot emulate."""

    def __init__(self, sagemaker, logs, poll_seconds: int):
        self.sagemaker, self.logs = sagemaker, logs
        self.poll_seconds = poll_seconds
        self.tokens: dict[str, str] = {}  # per log stream: where the next read starts
        self.tail = True

    def wait(self, name: str, on_update: Callable[[dict[str, Any], list[str]], None]) -> dict[str, Any]:
        """Every ``poll_seconds`` until the job has ended: its new log lines, then its description (so
        the lines come before the status they led to), to ``on_update``. Its last description."""
        while True:
            lines = self.new_log_lines(name)
            description = self.describe(name)
            on_update(description, lines)
            if description["TrainingJobStatus"] in ENDED:
                return description
            time.sleep(self.poll_seconds)

    def describe(self, name: str) -> dict[str, Any]:
        return self.sagemaker.describe_training_job(TrainingJobName=name)

    def new_log_lines(self, name: str) -> list[str]:
        """The CloudWatch events the chief logged since the last call, oldest first (its streams in name
        order: a spot restart starts a new one); none before SageMaker has made them."""
        from botocore.exceptions import ClientError

        if not self.tail:
            return []
        try:
            pages = self.logs.get_paginator("describe_log_streams").paginate(
                logGroupName=LOG_GROUP, logStreamNamePrefix=f"{name}/{CHIEF_HOST}-")
            return [line for page in pages for stream in page["logStreams"]
                    for line in self._new_events(stream["logStreamName"])]
        except ClientError as exc:
            if aws.error_code(exc) == "ResourceNotFoundException":
                return []
            # e.g. no logs:GetLogEvents: failing here would leave the job running, unwatched.
            self.tail = False
            print(f"train: cannot read the job's logs in {LOG_GROUP} ({exc}); printing its status only", flush=True)
            return []

    def _new_events(self, stream: str) -> list[str]:
        lines = []
        while True:
            token = self.tokens.get(stream)
            page = self.logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=True,
                                            **({"nextToken": token} if token else {}))
            self.tokens[stream] = page["nextForwardToken"]
            lines += [event["message"] for event in page["events"]]
            if not page["events"] or page["nextForwardToken"] == token:
                return lines

    def stop(self, name: str) -> None:
        self.sagemaker.stop_training_job(TrainingJobName=name)


class StatusPrinter:
    """While the job runs: the train stage's own lines from its logs (those starting ``train:``; of its
    step lines, the newest of each poll), one line per status change (SageMaker's secondary status
    and its message), and a heartbeat when nothing else is printed."""

    def __init__(self, name: str, max_run_minutes: int):
        self.name, self.max_run_minutes = name, max_run_minutes
        self.last: tuple[str, str] | None = None
        self.printed = 0.0

    def __call__(self, description: dict[str, Any], log_lines: list[str]) -> None:
        lines = self.stage_lines(log_lines)
        status = description.get("SecondaryStatus") or description["TrainingJobStatus"]
        message = next((t.get("StatusMessage", "") for t in reversed(description.get("SecondaryStatusTransitions", []))
                        if t.get("Status") == status), "")
        if (status, message) != self.last:
            self.last = (status, message)
            lines.append(f"train: job {self.name}: {status}" + (f": {message}" if message else ""))
        now = time.monotonic()
        if lines:
            self.printed = now
            print("\n".join(lines), flush=True)
        elif now - self.printed >= HEARTBEAT_SECONDS:
            self.printed = now
            minutes = (datetime.now(UTC) - description["CreationTime"]).total_seconds() / 60
            print(f"train: job {self.name}: still {status}, {minutes:.0f} min since it was created "
                  f"(training stops at {self.max_run_minutes} min)", flush=True)

    def stage_lines(self, events: list[str]) -> list[str]:
        """The ``train:`` lines of ``events``, of their step lines (``progress.STEP``) only the newest."""
        lines = [part.strip() for event in events for part in event.splitlines()]
        lines = [line for line in lines if line.startswith("train:")]
        steps = [i for i, line in enumerate(lines) if (progress.parse(line) or {}).get("steps")]
        return [line for i, line in enumerate(lines) if i not in steps[:-1]]


def _wait(watcher: JobWatcher, name: str, c) -> dict[str, Any]:
    try:
        return watcher.wait(name, StatusPrinter(name, int(c.max_run_minutes)))
    except KeyboardInterrupt:
        from botocore.exceptions import ClientError

        try:
            watcher.stop(name)
        except ClientError as exc:  # e.g. it ended in the meantime
            print(f"train: could not stop job {name}: {exc}", flush=True)
            raise KeyboardInterrupt from exc
        print(f"train: stop requested for job {name}; its checkpoints stay in the checkpoint folder on S3, "
              "so the next run resumes from them", flush=True)
        raise


def land(s3, description: dict[str, Any], staging: Path, outputs: dict[str, Path]) -> None:
    """The job's model.tar.gz into ``staging`` (the future checkpoints folder), its logs to the log outputs."""
    uri = description["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = aws.split_s3_uri(uri)
    if aws.unless_missing(s3.head_object, "404", Bucket=bucket, Key=key) is None:
        raise TrainingJobError(f"job {description['TrainingJobName']}: its model {uri} is not in S3 (deleted?)")
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".model-download-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        s3.download_file(bucket, key, str(archive))
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")  # no absolute paths, links out or devices
    for name, output in ((CK.TRAIN_LOG, "log"), (CK.VAL_LOG, "val_log")):
        log = staging / name
        if not log.is_file():
            raise TrainingJobError(f"{uri}: no {name}: not an archive that detkit.cloud.training_contract published")
        atomic_write_bytes(Path(outputs[output]), log.read_bytes())
        log.unlink()
    if CK.latest(staging) is None or not (staging / CK.FINAL).is_dir():
        raise TrainingJobError(f"{uri}: no {CK.FINAL}/, or no {CK.INDEX} naming a checkpoint it holds")


# ---------------------------------------------------------------------------- the stage


def _check_settings(s3, c) -> None:
    where = f"conf/compute/{c.name}.yaml"
    if not c.role_arn:
        raise ConfigError(f"{where}: role_arn is not set: export SAGEMAKER_ROLE_ARN=<the IAM role the job assumes>")
    problem = aws.bucket_problem(s3, c.bucket, where, c.region)
    if problem:
        raise ConfigError(problem)


def run(cfg, inputs: dict[str, Path], outputs: dict[str, Path], *,
        watcher: type[JobWatcher] = JobWatcher) -> dict[str, Any]:
    """Train as a SageMaker job and land its model as a local run would leave it (see the module doc)."""
    from detkit.train.tracking import Tracker

    c = cfg.compute
    try:  # here, not in a job already started and paid for
        distribute.check_precision(cfg.train.mixed_precision, cfg.model.family)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    records = Path(inputs["records"])
    pretrained = Path(inputs["pretrained"]) if cfg.model.pretrained != "none" else None
    s3, sagemaker, logs = aws.clients(c.region, "s3", "sagemaker", "logs")
    _check_settings(s3, c)
    fp = CK.fingerprint(cfg, records, pretrained)
    attempt, newest = newest_attempt(sagemaker, c, fp)
    previous = _previous(s3, sagemaker, newest)
    checkpoints = Path(outputs["checkpoints"])
    with atomic_dir(checkpoints) as staging:  # replaces checkpoints only if everything below succeeds
        tracker = Tracker(cfg, staging / CK.RUN_FILE, resume=False, start_step=0)
        try:
            if previous:
                name, arn = newest["TrainingJobName"], newest["TrainingJobArn"]
                print(f"train: job {name} already trained these params and data: reusing its model, no new job"
                      if previous == "reuse" else f"train: job {name} is already training these params and data "
                      f"({newest['TrainingJobStatus']}): waiting for it")
            else:
                name = job_name(c, fp, attempt + 1)
                arn = _start(s3, sagemaker, cfg, name, fp, records, pretrained, tracker.run_id)
            tracker.set_tags({"compute": "sagemaker", "sagemaker_job_name": name, "sagemaker_job_arn": arn})
            description = (sagemaker.describe_training_job(TrainingJobName=name) if previous == "reuse"
                           else _wait(watcher(sagemaker, logs, int(c.poll_seconds)), name, c))
            if description["TrainingJobStatus"] != "Completed":
                reason = description.get("FailureReason") or description.get("SecondaryStatus", "")
                raise TrainingJobError(
                    f"job {name} ended {description['TrainingJobStatus']}: {reason}. {_shown(checkpoints)} is "
                    f"unchanged; the job's checkpoints stay in {checkpoint_uri(c, fp)}, and the next run resumes "
                    "from them (as a new attempt)")
            land(s3, description, staging, outputs)
        except BaseException:
            tracker.fail()
            raise
    rows = CK.read_log(Path(outputs["log"]), CK.LOG_FIELDS)
    tracker.add(rows, CK.LOG_FIELDS)
    tracker.add(CK.read_log(Path(outputs["val_log"]), CK.VAL_FIELDS), CK.VAL_FIELDS, prefix="val/")
    seconds = {metric: description[key] for key, metric in (("TrainingTimeInSeconds", "sagemaker_training_seconds"),
                                                             ("BillableTimeInSeconds", "sagemaker_billable_seconds"))
               if description.get(key) is not None}
    tracker.finish({CK.FINAL: checkpoints / CK.FINAL}, seconds)
    billed, hourly = seconds.get("sagemaker_billable_seconds"), c.hourly_usd.get(c.instance_type)
    print(f"train: job {name} Completed; model in {_shown(checkpoints / CK.FINAL)}; MLflow run {tracker.run_id}"
          + (f"; billed {billed} s x {c.instance_count}, about ${billed * c.instance_count * hourly / 3600:.2f}"
             if billed is not None and hourly is not None else ""))
    return {"model": cfg.model.name, "steps": int(cfg.train.steps), "chief": True, "final": str(checkpoints / CK.FINAL),
            "final_loss": rows[-1]["loss"] if rows else None, "mlflow_run_id": tracker.run_id, "job_name": name,
            "job_arn": arn, "reused": previous == "reuse", **seconds}


def _previous(s3, sagemaker, newest: dict[str, Any] | None) -> str | None:
    """What the newest attempt leaves to do: "reuse" its model (Completed, the model still in S3),
    "wait" for it (still running), or None: start a new attempt."""
    if newest is None:
        return None
    name, status = newest["TrainingJobName"], newest["TrainingJobStatus"]
    if status in ("InProgress", "Stopping"):
        return "wait"
    if status == "Completed":
        uri = sagemaker.describe_training_job(TrainingJobName=name)["ModelArtifacts"]["S3ModelArtifacts"]
        bucket, key = aws.split_s3_uri(uri)
        if aws.unless_missing(s3.head_object, "404", Bucket=bucket, Key=key) is not None:
            return "reuse"
        print(f"train: job {name} completed, but its model {uri} is no longer in S3: starting a new attempt")
    return None


def _start(s3, sagemaker, cfg, name: str, fp: str, records: Path, pretrained: Path | None, run_id: str) -> str:
    """Upload what is missing, print the cost, create the job; its ARN."""
    from botocore.exceptions import ClientError

    c = cfg.compute
    channels = {"records": upload_folder(s3, c, "records", records)}
    if pretrained is not None:
        channels["pretrained"] = upload_folder(s3, c, "pretrained", pretrained)
    code = upload_code(s3, c, workspace_root())
    print(cost_line(c))
    try:
        arn = sagemaker.create_training_job(**job_request(cfg, name, fp, channels, code, run_id))["TrainingJobArn"]
    except ClientError as exc:
        raise TrainingJobError(f"SageMaker refused job {name}: {exc}") from exc
    print(f"train: started job {name} on {c.instance_count} x {c.instance_type}{' (spot)' if c.spot else ''}, "
          f"image {training_image(c)}, checkpoints in {checkpoint_uri(c, fp)}", flush=True)
    return arn
