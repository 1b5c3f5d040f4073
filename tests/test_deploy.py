"""detkit.cloud.deploy against moto in server mode on 127.0.0.1: the endpoint lifecycle with either
image kind, the quality gate, the batching plan, guarded updates and their alarms,
autoscaling, and the Make targets. No Docker engine here: the docker steps are a recorded
no-op (``RecordingDocker``), and moto's missing ``update_endpoint`` is answered at the boto3
client (``SageMakerUpdates``), where its real request is recorded."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import pytest
import requests
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from PIL import Image

from detkit.cloud import deploy
from detkit.config import load_config
from detkit.data.labelmap import read_label_map
from detkit.eval.draw import PREDICTED
from detkit.serve.predict import request_body
from harness.repo_copy import REPO_ROOT, make
from tests.drawing import changed_elsewhere, outline_share
from tests.moto_server import moto_server, reset

pytestmark = pytest.mark.slow

ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"
REGION = "us-east-1"
BUCKET = "pets-deploy"
AWS_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/tensorflow-inference:2.19.0-cpu-py312-ubuntu22.04-sagemaker"


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


class Body:
    """A response body as botocore reads one from urllib3."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def answer(request, status: int, body: dict) -> AWSResponse:
    headers = {"Content-Type": "application/x-amz-json-1.1"}
    return AWSResponse(request.url, status, headers, Body(json.dumps(body).encode()))


class SageMakerUpdates:
    """moto has no UpdateEndpoint. The real boto3 call runs; at its client ``requests`` records the
    parameters deploy gave it (provide-client-params), and SageMaker's answer stands in for the one
    moto lacks (before-send): the endpoint moves to the new config (re-created in moto, tags kept),
    or with ``roll_back_next_update`` stays on the old one while DescribeEndpoint carries the reason
    SageMaker gives (after-call). As SageMaker does, it refuses an update that changes the
    instance type of a variant Application Auto Scaling still holds, and with ``refuse_next_update``
    one that comes while another is in progress."""

    def __init__(self, clients):
        # Clients of their own: calls from inside the hooks must not run them again.
        made = deploy.clients(REGION)
        self.sagemaker, self.scaling = made["sagemaker"], made["application-autoscaling"]
        self.requests = []
        self.roll_back_next_update = self.refuse_next_update = False
        self.failure_reason = None
        events = clients["sagemaker"].meta.events
        events.register("provide-client-params.sagemaker.UpdateEndpoint", self.record)
        events.register("before-send.sagemaker.UpdateEndpoint", self.update)
        events.register("after-call.sagemaker.DescribeEndpoint", self.describe)

    def record(self, params, **_):
        self.requests.append(copy.deepcopy(params))

    def instance_type(self, config: str) -> str:
        return self.sagemaker.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"][0][
            "InstanceType"]

    def update(self, request, **_):
        params = self.requests[-1]
        name, config = params["EndpointName"], params["EndpointConfigName"]
        endpoint = self.sagemaker.describe_endpoint(EndpointName=name)
        scaled = self.scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[f"endpoint/{name}/variant/AllTraffic"])["ScalableTargets"]
        if scaled and self.instance_type(config) != self.instance_type(endpoint["EndpointConfigName"]):
            return answer(request, 400, {"__type": "ValidationException", "message": (
                'The variant(s) "[AllTraffic]" must be deregistered as scalable targets with AWS Application Auto '
                "Scaling before they can be removed or have their instance type updated.")})
        if self.refuse_next_update:
            self.refuse_next_update = False
            return answer(request, 400, {"__type": "ValidationException",
                                         "message": f'Cannot update in-progress endpoint "{endpoint["EndpointArn"]}".'})
        self.failure_reason = None
        if self.roll_back_next_update:
            self.roll_back_next_update = False
            alarm = params["DeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"][0]["AlarmName"]
            self.failure_reason = f"Deployment rolled back: alarm {alarm} went into ALARM"
        else:
            tags = self.sagemaker.list_tags(ResourceArn=endpoint["EndpointArn"])["Tags"]
            self.sagemaker.delete_endpoint(EndpointName=name)
            self.sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=config, Tags=tags)
        return answer(request, 200, {"EndpointArn": endpoint["EndpointArn"]})

    def describe(self, parsed, **_):
        if self.failure_reason:
            parsed["FailureReason"] = self.failure_reason


ALARMS = ["pet-object-detection-5xx-errors", "pet-object-detection-model-latency"]
PROJECT_TAG = {"Key": "project", "Value": "pet-object-detection"}
# The DeploymentConfig of conf/deploy/sagemaker.yaml's rollout: a canary of half the capacity.
CANARY = {
    "BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {"Type": "CANARY", "WaitIntervalInSeconds": 300,
                                        "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 50}},
        "TerminationWaitInSeconds": 120, "MaximumExecutionTimeoutInSeconds": 3600},
    "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in ALARMS]}}


def update_request(config: str, deployment_config: dict = CANARY) -> dict:
    return {"EndpointName": "pet-object-detection", "EndpointConfigName": config,
            "DeploymentConfig": deployment_config}


@pytest.fixture(scope="module")
def moto_url():
    with moto_server({"AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "SAGEMAKER_ROLE_ARN": ROLE,
                      "SAGEMAKER_BUCKET": BUCKET}) as url:
        yield url


@pytest.fixture
def aws(moto_url):
    reset(moto_url)
    made = deploy.clients(REGION)
    made["s3"].create_bucket(Bucket=BUCKET)
    return made


@pytest.fixture
def updates(aws) -> SageMakerUpdates:
    return SageMakerUpdates(aws)


@pytest.fixture
def switch(aws) -> deploy.EndpointSwitch:
    """deploy's own: its calls are the real ones, against moto."""
    return deploy.EndpointSwitch(aws["sagemaker"], wait_minutes=1)


@pytest.fixture(scope="module")
def packaged(demo_repo):
    """The demo's package stage outputs and eval metrics."""
    return demo_repo / "build" / "serving", demo_repo / "metrics" / "eval.json", demo_repo / "build" / "model.tar.gz"


def settings_for(packaged, *overrides, tag="rev1"):
    cfg = load_config(overrides=[f"deploy.image_tag={tag}", *overrides])
    context, metrics, archive = packaged
    return deploy.Settings(cfg.deploy, cfg.export.model_name, cfg.model.serving_gib, context, metrics, archive)


def test_first_deploy_creates_repository_model_config_and_endpoint(aws, packaged, updates, switch, capsys):
    sagemaker, ecr = aws["sagemaker"], aws["ecr"]
    docker = RecordingDocker()
    result = deploy.deploy(settings_for(packaged), aws, docker, switch)
    repository = ecr.describe_repositories(repositoryNames=["pet-object-detection"])["repositories"][0]
    assert repository["imageTagMutability"] == "IMMUTABLE"
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    assert PROJECT_TAG in ecr.list_tags_for_resource(resourceArn=repository["repositoryArn"])["tags"]
    arns = [sagemaker.describe_model(ModelName=result["model"])["ModelArn"],
            sagemaker.describe_endpoint_config(EndpointConfigName=result["config"])["EndpointConfigArn"],
            sagemaker.describe_endpoint(EndpointName="pet-object-detection")["EndpointArn"]]
    assert all(PROJECT_TAG in sagemaker.list_tags(ResourceArn=arn)["Tags"] for arn in arns)
    image = f"{repository['repositoryUri']}:rev1"
    assert docker.calls == [("build", image), ("login", "https://123456789012.dkr.ecr.us-east-1.amazonaws.com", "AWS"),
                            ("push", image)]
    model = sagemaker.describe_model(ModelName=result["model"])
    assert model["PrimaryContainer"]["Image"] == image and model["ExecutionRoleArn"] == ROLE
    # The default model (ResNet-50) on ml.m5.large: (0.8 x 8 GiB - 1.2) / (2 threads x 0.16 GiB) -> 16.
    assert model["PrimaryContainer"]["Environment"] == {"MODEL_NAME": "pet_object_detection",
                                                        "TFS_MAX_BATCH_SIZE": "16", "TFS_NUM_BATCH_THREADS": "2"}
    variant = sagemaker.describe_endpoint_config(EndpointConfigName=result["config"])["ProductionVariants"][0]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == \
        (result["model"], "ml.m5.large", 1)
    endpoint = sagemaker.describe_endpoint(EndpointName="pet-object-detection")
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", result["config"])
    out = capsys.readouterr().out
    assert "serving: batches of up to 16 images on 2 batch threads: about 6.3 GiB of ml.m5.large's 8 GiB" in out
    assert "make invoke IMAGE=" in out and "$0.115/hour" in out and "make undeploy" in out
    assert "price: ml.m5.large at $0.115/hour (us-east-1 list price) x 1 = $0.12/hour, about $83/month" in out
    assert "testing" not in out  # no credential is ever printed

    # What the push left in ECR; then the same tag again: an update, no new image.
    ecr.put_image(repositoryName="pet-object-detection", imageTag="rev1", imageManifest=json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json", "layers": []}))
    again = deploy.deploy(settings_for(packaged), aws, docker, switch)
    assert f"deploy: {image} is already in ECR (tags are immutable): not rebuilt" in capsys.readouterr().out
    assert len(docker.calls) == 3 and updates.requests == [update_request(again["config"])]


def test_aws_image_deploy_needs_no_docker_and_uploads_the_archive_once(aws, packaged, updates, switch, capsys):
    sagemaker, s3 = aws["sagemaker"], aws["s3"]
    docker = RecordingDocker()
    first = deploy.deploy(settings_for(packaged, "deploy.image=aws"), aws, docker, switch)
    digest = json.loads((packaged[0] / "package.json").read_text())["model_tar_gz_sha256"]
    key = f"pet-object-detection/models/{digest}/model.tar.gz"
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == packaged[2].read_bytes()
    container = sagemaker.describe_model(ModelName=first["model"])["PrimaryContainer"]
    assert container["Image"] == AWS_IMAGE and container["ModelDataUrl"] == f"s3://{BUCKET}/{key}"
    assert container["Environment"]["SAGEMAKER_TFS_DEFAULT_MODEL_NAME"] == "pet_object_detection"
    assert container["Environment"]["SAGEMAKER_TFS_MAX_BATCH_SIZE"] == "16"
    endpoint = sagemaker.describe_endpoint(EndpointName="pet-object-detection")
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", first["config"])
    uploaded = s3.head_object(Bucket=BUCKET, Key=key)["LastModified"]
    assert f"uploaded {packaged[2]}" in capsys.readouterr().out

    second = deploy.deploy(settings_for(packaged, "deploy.image=aws"), aws, docker, switch)
    assert updates.requests == [update_request(second["config"])]
    assert "is already in S3 (same sha256): not uploaded" in capsys.readouterr().out
    assert s3.head_object(Bucket=BUCKET, Key=key)["LastModified"] == uploaded
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]] == [key]
    assert second["image"] == AWS_IMAGE and docker.calls == []


def test_aws_image_is_resolved_per_region_and_device(packaged):
    settings = settings_for(packaged, "deploy.image=aws", "deploy.region=eu-south-1",
                            "deploy.instance_type=ml.g4dn.xlarge")
    assert deploy.aws_image(settings) == ("692866216735.dkr.ecr.eu-south-1.amazonaws.com/tensorflow-inference:"
                                          "2.19.0-gpu-py312-cu122-ubuntu22.04-sagemaker")


def test_make_deploy_with_the_aws_image_from_a_users_shell(aws, demo_repo):
    result = make(demo_repo, "deploy", "DEPLOY_IMAGE=aws")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "AWS's TensorFlow Serving image" in result.stdout and "InService" in result.stdout
    model = aws["sagemaker"].list_models()["Models"][0]["ModelName"]
    assert "ModelDataUrl" in aws["sagemaker"].describe_model(ModelName=model)["PrimaryContainer"]
    status = make(demo_repo, "status")
    assert status.returncode == 0, status.stderr
    assert f"on {AWS_IMAGE} with s3://{BUCKET}/pet-object-detection/models/" in status.stdout


def test_update_is_blue_green_with_the_endpoints_alarms(aws, packaged, updates, switch, capsys):
    sagemaker, cloudwatch = aws["sagemaker"], aws["cloudwatch"]
    first = deploy.deploy(settings_for(packaged), aws, RecordingDocker(), switch)
    assert updates.requests == []  # a first deploy creates
    second = deploy.deploy(settings_for(packaged, "deploy.rollout.traffic=linear", "deploy.rollout.step_percent=25",
                                        tag="rev2"), aws, RecordingDocker(), switch)
    assert second["previous"] == first["config"]
    assert updates.requests == [update_request(second["config"], {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "LINEAR", "WaitIntervalInSeconds": 300,
                                            "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25}},
            "TerminationWaitInSeconds": 120, "MaximumExecutionTimeoutInSeconds": 3600},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in ALARMS]}})]
    assert "blue/green, steps of 25%, 300 s baking per step" in capsys.readouterr().out
    assert sagemaker.describe_endpoint(EndpointName="pet-object-detection")["EndpointConfigName"] == second["config"]
    # The alarms the rollback waits on exist, on this endpoint's variant (their settings: test_guardrails.py).
    found = cloudwatch.describe_alarms(AlarmNames=ALARMS)["MetricAlarms"]
    assert sorted(a["AlarmName"] for a in found) == ALARMS
    variant = [{"Name": "EndpointName", "Value": "pet-object-detection"},
               {"Name": "VariantName", "Value": "AllTraffic"}]
    assert all(sorted(a["Dimensions"], key=lambda d: d["Name"]) == variant for a in found)


def test_an_update_sagemaker_rolled_back_is_reported_as_such(aws, packaged, updates, switch):
    sagemaker = aws["sagemaker"]
    first = deploy.deploy(settings_for(packaged), aws, RecordingDocker(), switch)
    updates.roll_back_next_update = True
    with pytest.raises(deploy.DeployError, match=f"alarm pet-object-detection-5xx-errors went into ALARM.*endpoint "
                                                 f"pet-object-detection is InService with {first['config']}"):
        deploy.deploy(settings_for(packaged, tag="rev2"), aws, RecordingDocker(), switch)
    # One update, guarded by the alarms; no second, hand-made one: SageMaker rolled back by itself.
    (request,) = updates.requests
    assert request == update_request(request["EndpointConfigName"]) and request["EndpointConfigName"] != first["config"]
    endpoint = sagemaker.describe_endpoint(EndpointName="pet-object-detection")
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", first["config"])


def test_an_update_keeps_the_instances_autoscaling_added(aws, packaged, updates, switch):
    sagemaker = aws["sagemaker"]
    deploy.deploy(settings_for(packaged), aws, RecordingDocker(), switch)
    sagemaker.update_endpoint_weights_and_capacities(  # what a scale-out does to the variant
        EndpointName="pet-object-detection", DesiredWeightsAndCapacities=[{"VariantName": "AllTraffic",
                                                                           "DesiredInstanceCount": 2}])
    second = deploy.deploy(settings_for(packaged, tag="rev2"), aws, RecordingDocker(), switch)
    assert updates.requests == [update_request(second["config"])]
    variant = sagemaker.describe_endpoint_config(EndpointConfigName=second["config"])["ProductionVariants"][0]
    assert variant["InitialInstanceCount"] == 2


def scaled(aws) -> tuple[list, list]:
    """The variant's scalable targets and policies, as (min, max) and (name, target, cool-downs)."""
    scaling, resource = aws["application-autoscaling"], "endpoint/pet-object-detection/variant/AllTraffic"
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)
    return ([(t["MinCapacity"], t["MaxCapacity"]) for t in targets["ScalableTargets"]],
            [(p["PolicyName"], p["TargetTrackingScalingPolicyConfiguration"]["TargetValue"])
             for p in policies["ScalingPolicies"]])


def test_an_instance_type_change_lifts_autoscaling_for_the_update_and_restores_it(aws, packaged, updates, switch,
                                                                                  capsys):
    sagemaker, configured = aws["sagemaker"], ([(1, 2)], [("pet-object-detection-invocations-per-instance", 60.0)])
    first = deploy.deploy(settings_for(packaged), aws, RecordingDocker(), switch)
    assert scaled(aws) == configured
    # Refused: the update failed, and the endpoint scales as before all the same.
    updates.refuse_next_update = True
    with pytest.raises(ClientError, match="Cannot update in-progress endpoint"):
        deploy.deploy(settings_for(packaged, "deploy.instance_type=ml.m5.xlarge", tag="rev2"), aws, RecordingDocker(),
                      switch)
    assert scaled(aws) == configured
    assert sagemaker.describe_endpoint(EndpointName="pet-object-detection")["EndpointConfigName"] == first["config"]
    # Through: SageMaker took the update (it refuses one while the variant is a scalable target).
    third = deploy.deploy(settings_for(packaged, "deploy.instance_type=ml.m5.xlarge", tag="rev3"), aws,
                          RecordingDocker(), switch)
    assert [r["EndpointConfigName"] for r in updates.requests][-1] == third["config"]
    assert scaled(aws) == configured
    variant = sagemaker.describe_endpoint_config(EndpointConfigName=third["config"])["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.m5.xlarge"
    assert "ml.m5.large -> ml.m5.xlarge: autoscaling removed for the update, applied again after" in \
        capsys.readouterr().out


def test_deploy_leaves_an_endpoint_it_did_not_create_alone(aws, packaged, switch):
    sagemaker = aws["sagemaker"]
    sagemaker.create_model(ModelName="theirs", ExecutionRoleArn=ROLE,
                           PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/other:1"})
    sagemaker.create_endpoint_config(EndpointConfigName="theirs", ProductionVariants=[{
        "VariantName": "AllTraffic", "InstanceType": "ml.m5.large", "ModelName": "theirs", "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName="pet-object-detection", EndpointConfigName="theirs")
    with pytest.raises(deploy.DeployError, match="was not created by this project .* not updated"):
        deploy.deploy(settings_for(packaged), aws, RecordingDocker(), switch)
    assert [m["ModelName"] for m in sagemaker.list_models()["Models"]] == ["theirs"]
    assert aws["cloudwatch"].describe_alarms()["MetricAlarms"] == []


def test_autoscaling_is_applied_with_the_configured_values(aws, packaged, switch, capsys):
    scaling = aws["application-autoscaling"]
    settings = settings_for(packaged, "deploy.autoscaling.max_instances=3",
                            "deploy.autoscaling.target_invocations_per_instance=120")
    deploy.deploy(settings, aws, RecordingDocker(), switch)
    resource = "endpoint/pet-object-detection/variant/AllTraffic"
    target = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])["ScalableTargets"]
    assert [(t["MinCapacity"], t["MaxCapacity"], t["ScalableDimension"]) for t in target] == \
        [(1, 3, "sagemaker:variant:DesiredInstanceCount")]
    policy = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]
    tracking = policy[0]["TargetTrackingScalingPolicyConfiguration"]
    assert (policy[0]["PolicyType"], tracking["TargetValue"], tracking["ScaleInCooldown"],
            tracking["ScaleOutCooldown"]) == ("TargetTrackingScaling", 120.0, 300, 60)
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    out = capsys.readouterr().out
    assert "autoscaling: 1-3 instances, holding 120 invocations per instance per minute" in out
    assert "autoscaling may run up to 3 ($0.35/hour)" in out


@pytest.mark.parametrize(("overrides", "size"), [([], 16), (["deploy.instance_type=ml.t2.medium"], 6),
                                                 (["deploy.instance_type=ml.m5.xlarge"], 18),
                                                 (["model=retinanet_tiny"], 32)])
def test_batch_size_is_what_the_instance_memory_holds(packaged, overrides, size):
    assert deploy.serving_plan(settings_for(packaged, *overrides))["max_batch_size"] == size


def test_batch_size_that_does_not_fit_is_refused_with_the_figures(packaged):
    with pytest.raises(deploy.DeployError, match=r"max_batch_size 32 x 2 batch threads needs about 11.4 GiB; "
                                                 r"ml.m5.large offers 6.4 GiB \(at most 16 fits\)"):
        deploy.serving_plan(settings_for(packaged, "deploy.serving.max_batch_size=32"))


def test_gate_refuses_a_model_below_min_ap50_and_creates_nothing(aws, packaged, switch):
    sagemaker, ecr = aws["sagemaker"], aws["ecr"]
    ap50 = json.loads(packaged[1].read_text())["AP50"]
    assert ap50 < 1.0  # the demo model is good, not perfect: 1.0 refuses it
    with pytest.raises(deploy.DeployError, match=rf"AP50 {ap50:.3f} in .*eval.json is below deploy.min_ap50 1.0"):
        deploy.deploy(settings_for(packaged, "deploy.min_ap50=1.0"), aws, RecordingDocker(),
                      switch)
    assert sagemaker.list_models()["Models"] == [] and ecr.describe_repositories()["repositories"] == []


def test_gate_refuses_a_failed_export_check(aws, packaged, switch, tmp_path):
    sagemaker = aws["sagemaker"]
    context = tmp_path / "serving"
    shutil.copytree(packaged[0], context)
    manifest = json.loads((context / "package.json").read_text())
    (context / "package.json").write_text(json.dumps({**manifest, "export_check_passed": False}))
    settings = settings_for((context, *packaged[1:]))
    with pytest.raises(deploy.DeployError, match="export check of pet_object_detection version 1 failed .*"
                                                 "export_check.json"):
        deploy.deploy(settings, aws, RecordingDocker(), switch)
    assert sagemaker.list_models()["Models"] == []


def test_deploy_without_a_role_says_how_to_set_it(aws, packaged, switch, monkeypatch):
    monkeypatch.delenv("SAGEMAKER_ROLE_ARN")
    with pytest.raises(deploy.DeployError, match="export SAGEMAKER_ROLE_ARN="):
        deploy.deploy(settings_for(packaged), aws, RecordingDocker(), switch)


def test_aws_image_without_a_bucket_says_how_to_set_it(aws, packaged, switch, monkeypatch):
    monkeypatch.delenv("SAGEMAKER_BUCKET")
    with pytest.raises(deploy.DeployError, match="bucket is not set: export SAGEMAKER_BUCKET="):
        deploy.deploy(settings_for(packaged, "deploy.image=aws"), aws, RecordingDocker(),
                      switch)
    assert aws["sagemaker"].list_models()["Models"] == []


def test_make_status_and_undeploy_cover_alarms_and_autoscaling_and_leave_the_rest(aws, packaged, demo_repo,
                                                                                   updates, switch):
    sagemaker, cloudwatch, scaling = aws["sagemaker"], aws["cloudwatch"], aws["application-autoscaling"]
    theirs = [{"Key": "team", "Value": "someone-else"}]
    sagemaker.create_model(ModelName="pet-object-detection-theirs", ExecutionRoleArn=ROLE, Tags=theirs,
                           PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/other:1"})
    sagemaker.create_endpoint_config(EndpointConfigName="pet-object-detection-theirs", Tags=theirs,
                                     ProductionVariants=[{"VariantName": "AllTraffic", "InstanceType": "ml.m5.large",
                                                          "ModelName": "pet-object-detection-theirs",
                                                          "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName="their-endpoint", EndpointConfigName="pet-object-detection-theirs",
                              Tags=theirs)
    cloudwatch.put_metric_alarm(AlarmName="their-alarm", Namespace="AWS/SageMaker", MetricName="ModelLatency",
                                Statistic="Average", Period=60, EvaluationPeriods=1, Threshold=1.0,
                                ComparisonOperator="GreaterThanThreshold")
    deploy.deploy(settings_for(packaged), aws, RecordingDocker(), switch)
    deploy.deploy(settings_for(packaged, "deploy.image=aws"), aws, RecordingDocker(), switch)

    status = make(demo_repo, "status")
    assert status.returncode == 0, status.stderr
    assert "endpoint pet-object-detection: InService" in status.stdout
    assert re.search(r"alarms: pet-object-detection-5xx-errors \(\w+\), pet-object-detection-model-latency \(\w+\)",
                     status.stdout)
    assert ("autoscaling: 1-2 instances, pet-object-detection-invocations-per-instance (target 60 "
            "SageMakerVariantInvocationsPerInstance, cool-downs in 300 s / out 60 s)") in status.stdout
    assert "pet-object-detection-theirs" not in status.stdout

    result = make(demo_repo, "undeploy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed the autoscaling of pet-object-detection" in result.stdout
    assert "deleted endpoint pet-object-detection" in result.stdout
    assert [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]] == ["their-endpoint"]
    assert [m["ModelName"] for m in sagemaker.list_models()["Models"]] == ["pet-object-detection-theirs"]
    assert [c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]] == \
        ["pet-object-detection-theirs"]
    assert [a["AlarmName"] for a in cloudwatch.describe_alarms()["MetricAlarms"]] == ["their-alarm"]
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert sagemaker.describe_endpoint(EndpointName="their-endpoint")["EndpointStatus"] == "InService"
    again = make(demo_repo, "undeploy")
    assert again.returncode == 0 and "deleted 0 alarms, 0 endpoint configs and 0 models" in again.stdout
    assert "autoscaling: none" in make(demo_repo, "status").stdout


def test_make_deploy_without_docker_says_so_and_names_the_way_without(aws, demo_repo):
    if deploy.DockerEngine.available():
        pytest.skip("a Docker engine exists here: make deploy would really build and push")
    result = make(demo_repo, "deploy")
    assert result.returncode != 0
    assert "no Docker engine here" in result.stderr and "make deploy DEPLOY_IMAGE=aws" in result.stderr
    assert aws["sagemaker"].list_models()["Models"] == []


def test_make_invoke_sends_the_rest_body_and_reports(aws, moto_url, demo_repo, served, val_examples, tmp_path):
    # moto's invoke_endpoint answers from a queue: fill it with the real model's answer.
    example = val_examples[0]
    answer = requests.post(served.invocations_url, data=request_body([example["encoded"]]), timeout=60,
                           headers={"content-type": "application/json"}).text
    requests.post(f"{moto_url}/moto-api/static/sagemaker/endpoint-results", timeout=10,
                  json={"region": REGION, "results": [{"Body": answer, "ContentType": "application/json"}]})
    image = tmp_path / "pet.jpg"
    image.write_bytes(example["encoded"])
    result = make(demo_repo, "invoke", f"IMAGE={image}")
    assert result.returncode == 0, result.stdout + result.stderr
    label_map = read_label_map(demo_repo / "data" / "records" / "label_map.pbtxt")
    assert result.stdout.splitlines()[1].split()[0] == label_map[example["labels"][0]]
    prediction = json.loads(answer)["predictions"][0]
    count = int(prediction["num_detections"])
    ranked = zip(prediction["detection_boxes"][:count], prediction["detection_scores"][:count])
    boxes = [box for box, score in ranked if score >= 0.3][:5]
    drawn = Image.open(tmp_path / "pet_detections.png")
    assert boxes and [outline_share(drawn, box, [PREDICTED]) for box in boxes] == pytest.approx([1.0] * len(boxes),
                                                                                                abs=0.1)
    assert changed_elsewhere(Image.open(image), drawn, boxes) == 0


def test_invoke_sends_the_rest_body_as_json_to_the_endpoint(aws, moto_url, monkeypatch, tmp_path, capsys):
    sent = []

    def recording(region, session=deploy.aws.session):
        made = session(region)
        made.events.register("provide-client-params.sagemaker-runtime.InvokeEndpoint",
                             lambda params, **_: sent.append(dict(params)))
        return made

    monkeypatch.setattr(deploy.aws, "session", recording)
    answer = {"predictions": [{"detection_boxes": [[0.1, 0.2, 0.6, 0.7]], "detection_classes": [2.0],
                               "detection_scores": [0.9], "num_detections": 1.0}]}
    requests.post(f"{moto_url}/moto-api/static/sagemaker/endpoint-results", timeout=10,
                  json={"region": REGION, "results": [{"Body": json.dumps(answer), "ContentType": "application/json"}]})
    image = tmp_path / "pet.png"
    Image.new("RGB", (64, 48), (90, 120, 150)).save(image)
    assert deploy.main(["invoke", str(image), "export.model_name=nothing-exported-here"]) == 0
    (request,) = sent
    assert (request["EndpointName"], request["ContentType"]) == ("pet-object-detection", "application/json")
    assert json.loads(request["Body"]) == json.loads(request_body([image.read_bytes()]))
    out, err = capsys.readouterr()
    assert "id 2 " in out  # no export here: classes by id, and the user is told how to name them
    folder = REPO_ROOT / "models" / "export" / "nothing-exported-here"
    assert err == f"invoke: no export in {folder}: classes are shown by id (--export or --label-map names them)\n"


def test_a_refusal_is_one_error_line_and_exit_status_2(aws, packaged, capsys):
    context, metrics, archive = packaged
    status = deploy.main(["deploy", "--context", str(context), "--archive", str(archive), "--metrics", str(metrics),
                          "deploy.min_ap50=1.0", "deploy.image=aws"])
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: refused: val AP50 ")
    assert aws["sagemaker"].list_models()["Models"] == []


def test_names_are_sagemakers_and_the_image_tag_names_the_commit(tmp_path, monkeypatch):
    name = deploy.resource_name("pet-object-detection", "feature/x_1.2" * 6)
    assert len(name) == 63 and re.fullmatch(r"pet-object-detection-feature-x-1-2[a-zA-Z0-9-]*-\d{8}-\d{6}", name)

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    cfg = load_config().deploy
    git("init", "-q")
    (tmp_path / "model.txt").write_text("one\n")
    git("add", "model.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", "commit", "-qm", "one")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    settings = deploy.Settings(cfg, "pet_object_detection", None, None, None)
    revision = git("rev-parse", "--short=12", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked: not in the image's name\n")
    assert deploy.image_tag(settings) == revision
    (tmp_path / "model.txt").write_text("two\n")
    assert re.fullmatch(rf"{revision}-dirty-\d{{14}}", deploy.image_tag(settings))


def test_an_update_waits_as_long_as_its_rollout_may_take(packaged):
    assert deploy.update_wait_minutes(settings_for(packaged).cfg) == 60  # rollout.max_execution_timeout_s 3600
    assert deploy.update_wait_minutes(settings_for(packaged, "deploy.wait_minutes=90").cfg) == 90

