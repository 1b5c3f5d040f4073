"""One command-line convention for every program, run as a user does (an activated venv, `python -m ...`):
config overrides in Hydra's grammar as trailing KEY=VALUE, taking effect for the run; a typo'd key
is exit status 2 and one line on stderr naming it with its closest key, before any work (and, for the
train stage, before TensorFlow loads)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from detkit.config.cli import split_overrides
from detkit.models.family import INFO_FILE
from detkit.serve.predict import client_arguments
from harness.httpserver import free_port
from harness.repo_copy import activated_env
from tests.conftest import REPO_ROOT
from tests.moto_server import moto_server
from tests.test_demo import TF_STARTUP

# Each program with its own arguments ({tmp}: an empty folder), a typo'd override, and the line it must print.
TYPOS = {
    "stages.download": (["--out", "{tmp}/raw", "--cache", "{tmp}/cache"], "dataset.local_dri=x",
                        "unknown key 'dataset.local_dri' (did you mean 'local_dir'?)"),
    "stages.tfrecord": (["--raw", "{tmp}/raw", "--out", "{tmp}/records"], "tfrecord.train_shrads=3",
                        "unknown key 'tfrecord.train_shrads' (did you mean 'train_shards'?)"),
    "stages.pretrained": (["--out", "{tmp}/pretrained", "--cache", "{tmp}/cache"], "model.pretrianed=none",
                          "unknown key 'model.pretrianed' (did you mean 'pretrained'?)"),
    "stages.train": (["--records", "{tmp}/records", "--checkpoints", "{tmp}/checkpoints", "--log", "{tmp}/log.csv",
                      "--val-log", "{tmp}/val.csv"], "train.stpes=10",
                     "unknown key 'train.stpes' (did you mean 'steps'?)"),
    "stages.eval": (["--records", "{tmp}/records", "--checkpoints", "{tmp}/checkpoints", "--metrics", "{tmp}/metrics",
                     "--plots", "{tmp}/plots"], "eval.num_smaples=1",
                    "unknown key 'eval.num_smaples' (did you mean 'num_samples'?)"),
    "stages.export": (["--checkpoints", "{tmp}/checkpoints", "--records", "{tmp}/records", "--out", "{tmp}/export"],
                      "export.modle_name=x", "unknown key 'export.modle_name' (did you mean 'model_name'?)"),
    "stages.package": (["--export", "{tmp}/export", "--serving", "serving", "--context", "{tmp}/context",
                        "--archive", "{tmp}/model.tar.gz"], "export.model_nmae=x",
                       "unknown key 'export.model_nmae' (did you mean 'model_name'?)"),
    "detkit.cloud.deploy": (["status"], "deploy.regoin=eu-west-1",
                            "unknown key 'deploy.regoin' (did you mean 'region'?)"),
    "detkit.cloud.transform": (["s3://bucket/in/", "s3://bucket/out/"], "deploy.transform.instance_cuont=2",
                               "unknown key 'deploy.transform.instance_cuont' (did you mean 'instance_count'?)"),
    "detkit.serve.batch": (["{tmp}", "{tmp}/out"], "export.model_nam=x",
                           "unknown key 'export.model_nam' (did you mean 'model_name'?)"),
    "detkit.serve.predict": (["{tmp}/cat.jpg"], "export.modelname=x",
                             "unknown key 'export.modelname' (did you mean 'model_name'?)"),
    "detkit.serve.tfserving": ([], "export.model_nme=x", "unknown key 'export.model_nme' (did you mean 'model_name'?)"),
    "detkit.config.show": (["model.name"], "model.imag_size=64",
                           "unknown key 'model.imag_size' (did you mean 'image_size'?)"),
}


def python(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd`` from a shell with the venv activated (the repository's code importable)."""
    return subprocess.run(["python", *args], cwd=cwd, env=activated_env(PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True)


def program(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return python("-m", *args, cwd=cwd)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints, after checking its status and that it is alone on stderr."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A folder a program runs in as it would in the repository: params.yaml and conf/, nothing built."""
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    return tmp_path


@pytest.mark.parametrize("module", TYPOS)
def test_a_typo_in_an_override_is_one_line_naming_the_key_and_exit_2(module, tmp_path):
    arguments, typo, message = TYPOS[module]
    result = program(module, *[a.format(tmp=tmp_path) for a in arguments], typo)
    assert one_line(result) == f"error: override '{typo}': {message}"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_typo_fails_before_tensorflow_loads(tmp_path):
    runs = {module: [*(a.format(tmp=tmp_path) for a in arguments), typo]
            for module, (arguments, typo, _) in TYPOS.items()}
    result = program("tests.programs", "typos", json.dumps(runs))
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stdout + result.stderr


def test_a_misspelt_group_choice_lists_the_files():
    result = program("stages.train", "--records", "r", "--checkpoints", "c", "--log", "l", "--val-log", "v",
                     "model=retinanet_tinny")
    assert ("(did you mean 'retinanet_tiny'?); choose one of: dfine_medium, dfine_small, dfine_tiny, "
            "faster_rcnn_resnet101, faster_rcnn_tiny, retinanet_resnet50, retinanet_tiny") in one_line(result)


def test_usage_errors_are_one_line_too(tmp_path):
    assert "the following arguments are required: --out" in one_line(
        program("stages.download", "--cache", str(tmp_path), "dataset=sample"))
    assert "unexpected argument 'extra': config overrides are KEY=VALUE" in one_line(
        program("detkit.serve.batch", str(tmp_path), str(tmp_path / "out"), "extra"))
    assert "invalid choice: 'stauts'" in one_line(program("detkit.cloud.deploy", "stauts", "deploy.region=eu-west-1"))


def test_only_positionals_of_key_value_form_are_overrides():
    parser = argparse.ArgumentParser()
    client_arguments(parser)
    own, overrides = split_overrides(parser, ["a=b.jpg", "--out", "c=d.png", "model=retinanet_tiny", "--top", "3",
                                              "+train.extra=1", "~deploy.region", "./e=f.jpg", "--", "g=h.jpg"])
    assert overrides == ["a=b.jpg", "model=retinanet_tiny", "+train.extra=1", "~deploy.region"]
    assert own == ["--out", "c=d.png", "--top", "3", "./e=f.jpg", "--", "g=h.jpg"]


# ---------------------------------------------------------------------------- overrides take effect


def test_config_show_prints_the_overridden_value():
    result = program("detkit.config.show", "model.image_size", "model=retinanet_tiny", "model.image_size=96")
    assert (result.returncode, result.stdout) == (0, "96\n"), result.stderr


def test_download_copies_the_folder_an_override_names(tmp_path):
    (tmp_path / "mine" / "images").mkdir(parents=True)
    (tmp_path / "mine" / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    # params.yaml selects the Pets archives (a download); the overrides switch to a local folder.
    result = program("stages.download", "--out", str(tmp_path / "raw"), "--cache", str(tmp_path / "cache"),
                     "dataset=voc_custom", f"dataset.local_dir={tmp_path / 'mine'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "raw" / "images" / "a.jpg").read_bytes() == b"\xff\xd8\xff"


def test_tfrecord_takes_a_group_switch_and_nested_overrides(sample_raw, tmp_path):
    # params.yaml selects the real Pets dataset; the override switches to the sample for this run only.
    result = program("stages.tfrecord", "--raw", str(sample_raw), "--out", str(tmp_path / "records"),
                     "dataset=sample", "tfrecord.train_shards=3", "tfrecord.val_shards=1")
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "records" / "stats.json").read_text())
    assert [len(stats["splits"][split]["shards"]) for split in ("train", "val")] == [3, 1]
    assert len(list((tmp_path / "records").glob("train-*-of-00003.tfrecord"))) == 3


def test_pretrained_follows_the_model_an_override_picks(tmp_path):
    # params.yaml's model starts from a COCO-pretrained preset (a download); the tiny one from scratch.
    result = program("stages.pretrained", "--out", str(tmp_path / "pretrained"), "--cache", str(tmp_path / "cache"),
                     "model=retinanet_tiny")
    assert result.returncode == 0, result.stderr
    source = json.loads((tmp_path / "pretrained" / "source.json").read_text())
    assert (source["model"], source["kind"]) == ("retinanet_tiny", "none")


@pytest.mark.slow
def test_train_runs_the_steps_and_model_the_overrides_name(workspace, sample_records):
    result = program("stages.train", "--records", str(sample_records), "--checkpoints", "checkpoints",
                     "--log", "train_log.csv", "--val-log", "val_log.csv", "dataset=sample", "model=retinanet_tiny",
                     "model.image_size=64", "train.steps=2", "train.batch_size=2", "train.warmup_steps=1",
                     "train.checkpoint_every=2", "train.eval_every=0", cwd=workspace)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not TF_STARTUP.search(result.stderr), result.stderr  # nor oneDNN's notice at the first step
    info = json.loads((workspace / "checkpoints" / "final" / INFO_FILE).read_text())
    assert (info["step"], info["image_size"]) == (2, 64), info


@pytest.mark.slow
def test_eval_draws_as_many_samples_as_an_override_asks(demo_repo, tmp_path):
    result = program("stages.eval", "--records", "data/records", "--checkpoints", "models/checkpoints",
                     "--metrics", str(tmp_path / "metrics"), "--plots", str(tmp_path / "plots"),
                     "eval.num_samples=2", cwd=demo_repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list((tmp_path / "plots" / "eval_samples").glob("*.png"))) == 2


@pytest.mark.slow  # TensorFlow loads before the refusal
def test_export_takes_the_model_name_and_version_from_overrides(tmp_path):
    (tmp_path / "export" / "other" / "1").mkdir(parents=True)
    # Version 1 of the model the overrides name exists, so the export refuses before it loads anything.
    result = program("stages.export", "--checkpoints", str(tmp_path / "checkpoints"), "--records",
                     str(tmp_path / "records"), "--out", str(tmp_path / "export"), "export.model_name=other",
                     "export.version=1")
    line = one_line(result)
    assert f"{tmp_path / 'export' / 'other' / '1'}: version 1 exists and is never overwritten" in line


def test_package_packs_the_model_an_override_names(tmp_path):
    version = tmp_path / "export" / "other" / "3"
    version.mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"not read by package")
    result = program("stages.package", "--export", str(tmp_path / "export"), "--serving", "serving",
                     "--context", str(tmp_path / "context"), "--archive", str(tmp_path / "model.tar.gz"),
                     "export.model_name=other")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "context" / "package.json").read_text())
    assert (manifest["model_name"], manifest["version"]) == ("other", 3)


@pytest.fixture
def moto():
    with moto_server({"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}) as url:
        yield url


def test_deploy_status_looks_where_the_overrides_say(moto):
    result = program("detkit.cloud.deploy", "status", "deploy.region=eu-west-1", "deploy.endpoint_name=elsewhere")
    assert result.returncode == 0, result.stderr
    assert "status: no endpoint elsewhere in eu-west-1" in result.stdout


def test_transform_runs_the_job_on_the_instances_an_override_asks(moto):
    import boto3

    sagemaker, s3 = boto3.client("sagemaker"), boto3.client("s3")
    s3.create_bucket(Bucket="pets")
    s3.put_object(Bucket="pets", Key="in/pet.jpg", Body=b"\xff\xd8\xff")
    sagemaker.create_model(ModelName="pets-model", ExecutionRoleArn="arn:aws:iam::123456789012:role/sm",
                           PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/pets:1"})
    sagemaker.create_endpoint_config(EndpointConfigName="pets-config", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": "pets-model", "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName="pets-endpoint", EndpointConfigName="pets-config")
    result = program("detkit.cloud.transform", "s3://pets/in/", "s3://pets/out/", "deploy.endpoint_name=pets-endpoint",
                     "deploy.transform.instance_count=2")
    assert result.returncode == 0, result.stdout + result.stderr
    [job] = sagemaker.list_transform_jobs()["TransformJobSummaries"]
    described = sagemaker.describe_transform_job(TransformJobName=job["TransformJobName"])
    assert described["ModelName"] == "pets-model"
    assert described["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 2}


def test_a_mix_of_s3_and_local_folders_is_refused_by_both_batch_commands(tmp_path):
    assert "both must be s3:// (SageMaker Batch Transform) or both local folders" in one_line(
        program("detkit.serve.batch", str(tmp_path), "s3://pets/out/"))
    assert f"OUTPUT={tmp_path}: expected s3://bucket/prefix" in one_line(
        program("detkit.cloud.transform", "s3://pets/in/", str(tmp_path)))


def test_batch_runs_the_export_an_override_names(workspace, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "pet.jpg").write_bytes(b"\xff\xd8\xff")
    result = program("detkit.serve.batch", str(tmp_path / "images"), str(tmp_path / "out"), "export.model_name=other",
                     cwd=workspace)
    assert f"{workspace / 'models' / 'export' / 'other'}: no exported version" in one_line(result)


class Answers(BaseHTTPRequestHandler):
    """A model server answering every request with one detection of class 1."""

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        body = json.dumps({"predictions": [{"num_detections": 1.0, "detection_scores": [0.9],
                                            "detection_classes": [1.0], "detection_boxes": [[0.1, 0.1, 0.9, 0.9]]}]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.fixture
def answering() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/invocations"
    server.shutdown()


def test_predict_names_classes_from_the_export_an_override_names(workspace, answering, tmp_path):
    from PIL import Image

    assets = workspace / "models" / "export" / "other" / "1" / "assets.extra"
    assets.mkdir(parents=True)
    (assets / "label_map.pbtxt").write_text('item {\n  id: 1\n  name: "unicorn"\n}\n')
    Image.new("RGB", (32, 32)).save(tmp_path / "pet.jpg")
    result = program("detkit.serve.predict", str(tmp_path / "pet.jpg"), "--url", answering, "export.model_name=other",
                     cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:2] == ["unicorn", "0.900"]


def test_the_model_server_serves_the_model_an_override_names(workspace):
    (workspace / "models" / "export" / "other").mkdir(parents=True)
    port = free_port()
    process = subprocess.Popen(["python", "-m", "detkit.serve.tfserving", f"--rest_api_port={port}",
                                "export.model_name=other"], cwd=workspace, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=activated_env(PYTHONPATH=str(REPO_ROOT)))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/v1/models/other", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the model server did not answer within 60 s"
                time.sleep(0.2)
        # Served as 'other' from models/export/other, which holds no version yet.
        assert (answer.status_code, answer.json()) == (404, {"error": "Could not find any versions of model other"})
        assert requests.get(f"http://127.0.0.1:{port}/v1/models/pet_object_detection", timeout=5).json() == {
            "error": "Servable not found for request: Latest(pet_object_detection)"}
    finally:
        process.terminate()
        process.wait(timeout=30)
