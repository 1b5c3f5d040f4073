"""detkit.deploy against moto in server mode on 127.0.0.1: the endpoint lifecycle, the quality
gate, rollback, and the Make targets. No Docker engine here: the docker steps are a recorded
no-op (``RecordingDocker``), and moto's missing ``update_endpoint`` is emulated behind the
module's one seam (``MotoEndpointSwitch``)."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

from detkit import deploy
from detkit.config import load_config
from detkit.labelmap import read_label_map
from detkit.predict import request_body
from tests.moto_server import moto_server
from tests.repo_copy import make

pytestmark = pytest.mark.slow

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"
REGION = "us-east-1"


class RecordingDocker:
    """Stands in for the docker CLI where no engine exists: records what deploy asked for."""

    def __init__(self):
        self.calls = []

    def build(self, context, image):
        assert (context / "Dockerfile").is_file()
        self.calls.append(("build", image))

    def login(self, registry, username, password):
        assert password  # handed over, never recorded
        self.calls.append(("login", registry, username))

    def push(self, image):
        self.calls.append(("push", image))


class MotoEndpointSwitch(deploy.EndpointSwitch):
    """moto has no update_endpoint: an update re-creates the endpoint on the new config. With
    ``fail_next_update`` the next update ends Failed on the old config, as a real update whose
    new instances never come up."""

    def __init__(self, sagemaker, fail_next_update=False):
        super().__init__(sagemaker, wait_minutes=1)
        self.fail_next_update = fail_next_update
        self.updates = []
        self.failed = None

    def update(self, endpoint, config):
        self.updates.append(config)
        if self.fail_next_update:
            self.fail_next_update, self.failed = False, config
            return
        arn = self.sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointArn"]
        tags = self.sagemaker.list_tags(ResourceArn=arn)["Tags"]
        self.sagemaker.delete_endpoint(EndpointName=endpoint)
        self.sagemaker.create_endpoint(EndpointName=endpoint, EndpointConfigName=config, Tags=tags)
        self.failed = None

    def wait(self, endpoint):
        state = super().wait(endpoint)
        if self.failed:
            return {**state, "EndpointStatus": "Failed", "FailureReason": "instances failed the /ping health check"}
        return state


@pytest.fixture(scope="module")
def moto_url():
    with moto_server({"AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "SAGEMAKER_ROLE_ARN": ROLE}) as url:
        yield url


@pytest.fixture
def aws(moto_url):
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    return deploy.clients(REGION)


@pytest.fixture(scope="module")
def packaged(demo_repo):
    """The demo's package stage output and eval metrics."""
    return demo_repo / "build" / "serving", demo_repo / "metrics" / "eval.json"


def settings_for(packaged, *overrides, tag="rev1"):
    cfg = load_config(overrides=[f"deploy.image_tag={tag}", *overrides])
    context, metrics = packaged
    return deploy.Settings(cfg.deploy, cfg.export.model_name, context, metrics)


def test_first_deploy_creates_repository_model_config_and_endpoint(aws, packaged, capsys):
    sagemaker, ecr, _ = aws
    docker = RecordingDocker()
    result = deploy.deploy(settings_for(packaged), sagemaker, ecr, docker, MotoEndpointSwitch(sagemaker))
    repository = ecr.describe_repositories(repositoryNames=["pet-object-detection"])["repositories"][0]
    assert repository["imageTagMutability"] == "IMMUTABLE"
    image = f"{repository['repositoryUri']}:rev1"
    assert docker.calls == [("build", image), ("login", "https://123456789012.dkr.ecr.us-east-1.amazonaws.com", "AWS"),
                            ("push", image)]
    model = sagemaker.describe_model(ModelName=result["model"])
    assert model["PrimaryContainer"]["Image"] == image and model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Environment"] == {"MODEL_NAME": "pet_object_detection"}
    variant = sagemaker.describe_endpoint_config(EndpointConfigName=result["config"])["ProductionVariants"][0]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == \
        (result["model"], "ml.m5.large", 1)
    endpoint = sagemaker.describe_endpoint(EndpointName="pet-object-detection")
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", result["config"])
    out = capsys.readouterr().out
    assert "make invoke IMAGE=" in out and "$0.115/hour" in out and "make undeploy" in out
    assert "testing" not in out  # no credential is ever printed


def test_second_deploy_switches_the_endpoint_to_a_new_model(aws, packaged):
    sagemaker, ecr, _ = aws
    switch = MotoEndpointSwitch(sagemaker)
    first = deploy.deploy(settings_for(packaged), sagemaker, ecr, RecordingDocker(), switch)
    second = deploy.deploy(settings_for(packaged, tag="rev2"), sagemaker, ecr, RecordingDocker(), switch)
    assert second["model"] != first["model"] and second["config"] != first["config"]
    assert second["previous"] == first["config"] and switch.updates == [second["config"]]
    assert sagemaker.describe_endpoint(EndpointName="pet-object-detection")["EndpointConfigName"] == second["config"]
    assert sagemaker.describe_model(ModelName=second["model"])["PrimaryContainer"]["Image"].endswith(":rev2")


def test_failed_update_rolls_back_to_the_previous_config(aws, packaged, capsys):
    sagemaker, ecr, _ = aws
    switch = MotoEndpointSwitch(sagemaker)
    first = deploy.deploy(settings_for(packaged), sagemaker, ecr, RecordingDocker(), switch)
    switch.fail_next_update = True
    with pytest.raises(deploy.DeployError, match=f"rolled back: endpoint pet-object-detection is InService with "
                                                 f"{first['config']}"):
        deploy.deploy(settings_for(packaged, tag="rev2"), sagemaker, ecr, RecordingDocker(), switch)
    assert "rolling back to " + first["config"] in capsys.readouterr().out
    endpoint = sagemaker.describe_endpoint(EndpointName="pet-object-detection")
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", first["config"])


def test_gate_refuses_a_model_below_min_ap50_and_creates_nothing(aws, packaged):
    sagemaker, ecr, _ = aws
    ap50 = json.loads(packaged[1].read_text())["AP50"]
    with pytest.raises(deploy.DeployError, match=rf"AP50 {ap50:.3f} in .*eval.json is below deploy.min_ap50 0.99"):
        deploy.deploy(settings_for(packaged, "deploy.min_ap50=0.99"), sagemaker, ecr, RecordingDocker(),
                      MotoEndpointSwitch(sagemaker))
    assert sagemaker.list_models()["Models"] == [] and ecr.describe_repositories()["repositories"] == []


def test_gate_refuses_a_failed_export_check(aws, packaged, tmp_path):
    sagemaker, ecr, _ = aws
    context = tmp_path / "serving"
    shutil.copytree(packaged[0], context)
    manifest = json.loads((context / "package.json").read_text())
    (context / "package.json").write_text(json.dumps({**manifest, "export_check_passed": False}))
    settings = settings_for((context, packaged[1]))
    with pytest.raises(deploy.DeployError, match="export check of pet_object_detection version 1 failed .*"
                                                 "export_check.json"):
        deploy.deploy(settings, sagemaker, ecr, RecordingDocker(), MotoEndpointSwitch(sagemaker))
    assert sagemaker.list_models()["Models"] == []


def test_deploy_without_a_role_says_how_to_set_it(aws, packaged, monkeypatch):
    sagemaker, ecr, _ = aws
    monkeypatch.delenv("SAGEMAKER_ROLE_ARN")
    with pytest.raises(deploy.DeployError, match="export SAGEMAKER_ROLE_ARN="):
        deploy.deploy(settings_for(packaged), sagemaker, ecr, RecordingDocker(), MotoEndpointSwitch(sagemaker))


def test_make_undeploy_removes_ours_and_leaves_the_rest(aws, packaged, demo_repo):
    sagemaker, ecr, _ = aws
    theirs = [{"Key": "team", "Value": "someone-else"}]
    sagemaker.create_model(ModelName="pet-object-detection-theirs", ExecutionRoleArn=ROLE, Tags=theirs,
                           PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/other:1"})
    sagemaker.create_endpoint_config(EndpointConfigName="pet-object-detection-theirs", Tags=theirs,
                                     ProductionVariants=[{"VariantName": "AllTraffic", "InstanceType": "ml.m5.large",
                                                          "ModelName": "pet-object-detection-theirs",
                                                          "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName="their-endpoint", EndpointConfigName="pet-object-detection-theirs",
                              Tags=theirs)
    switch = MotoEndpointSwitch(sagemaker)
    deploy.deploy(settings_for(packaged), sagemaker, ecr, RecordingDocker(), switch)
    deploy.deploy(settings_for(packaged, tag="rev2"), sagemaker, ecr, RecordingDocker(), switch)

    status = make(demo_repo, "status")
    assert status.returncode == 0, status.stderr
    assert "endpoint pet-object-detection: InService" in status.stdout
    assert "pet-object-detection-theirs" not in status.stdout

    result = make(demo_repo, "undeploy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deleted endpoint pet-object-detection" in result.stdout
    assert [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]] == ["their-endpoint"]
    assert [m["ModelName"] for m in sagemaker.list_models()["Models"]] == ["pet-object-detection-theirs"]
    assert [c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]] == \
        ["pet-object-detection-theirs"]
    assert sagemaker.describe_endpoint(EndpointName="their-endpoint")["EndpointStatus"] == "InService"
    again = make(demo_repo, "undeploy")
    assert again.returncode == 0 and "deleted 0 endpoint configs and 0 models" in again.stdout


def test_make_deploy_without_docker_says_so(aws, demo_repo):
    if deploy.DockerEngine.available():
        pytest.skip("a Docker engine exists here: make deploy would really build and push")
    result = make(demo_repo, "deploy")
    assert result.returncode != 0
    assert "no Docker engine here" in result.stderr
    assert aws[0].list_models()["Models"] == []


def test_make_invoke_sends_the_rest_body_and_reports(aws, moto_url, demo_repo, served, val_examples, tmp_path):
    # moto's invoke_endpoint answers from a queue: fill it with the real model's answer.
    example = val_examples[0]
    answer = requests.post(served.invocations_url, data=request_body([example["encoded"]]), timeout=60).text
    requests.post(f"{moto_url}/moto-api/static/sagemaker/endpoint-results", timeout=10,
                  json={"region": REGION, "results": [{"Body": answer, "ContentType": "application/json"}]})
    image = tmp_path / "pet.jpg"
    image.write_bytes(example["encoded"])
    result = make(demo_repo, "invoke", f"IMAGE={image}")
    assert result.returncode == 0, result.stdout + result.stderr
    label_map = read_label_map(demo_repo / "data" / "records" / "label_map.pbtxt")
    assert result.stdout.splitlines()[1].split()[0] == label_map[example["labels"][0]]
    assert (tmp_path / "pet_detections.png").is_file()

