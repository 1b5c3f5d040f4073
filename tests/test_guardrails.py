"""detkit.cloud.guardrails against moto's CloudWatch on 127.0.0.1: the alarms that roll an update
back, as docs/deploy.md describes them, and the DeploymentConfig of each rollout."""

from __future__ import annotations

import copy

import pytest
import requests
from omegaconf import OmegaConf

from detkit.cloud import aws, guardrails
from detkit.config import load_config
from tests.moto_server import moto_server

REGION = "us-east-1"
ERRORS, LATENCY = "pet-object-detection-5xx-errors", "pet-object-detection-model-latency"
VARIANT = [{"Name": "EndpointName", "Value": "pet-object-detection"}, {"Name": "VariantName", "Value": "AllTraffic"}]
FIELDS = ("Namespace", "MetricName", "Statistic", "Period", "EvaluationPeriods", "Threshold", "ComparisonOperator",
          "TreatMissingData")


@pytest.fixture(scope="module")
def moto_url():
    with moto_server({"AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION}) as url:
        yield url


@pytest.fixture
def cloudwatch(moto_url):
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    return aws.clients(REGION, "cloudwatch")[0]


DEPLOY = load_config().deploy


def deploy_cfg(**changes):
    """conf/deploy/sagemaker.yaml with ``changes`` (dotted keys, ``__`` for ``.``): one config load per module."""
    cfg = copy.deepcopy(DEPLOY)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def alarms(cloudwatch) -> dict[str, dict]:
    return {a["AlarmName"]: a for a in cloudwatch.describe_alarms()["MetricAlarms"]}


def test_the_alarms_watch_the_variants_5xx_errors_and_model_latency(cloudwatch):
    assert guardrails.ensure_alarms(cloudwatch, deploy_cfg(), "AllTraffic") == [ERRORS, LATENCY]
    found = alarms(cloudwatch)
    assert sorted(found) == [ERRORS, LATENCY]
    assert {name: tuple(found[name][f] for f in FIELDS) for name in found} == {
        ERRORS: ("AWS/SageMaker", "Invocation5XXErrors", "Sum", 60, 2, 1.0, "GreaterThanOrEqualToThreshold",
                 "notBreaching"),
        LATENCY: ("AWS/SageMaker", "ModelLatency", "Average", 60, 2, 5_000_000.0,  # microseconds: 5000 ms
                  "GreaterThanThreshold", "notBreaching")}
    assert {name: alarm["AlarmDescription"] for name, alarm in found.items()} == {  # what the console shows
        ERRORS: "pet-object-detection: the model answered 5XX; rolls back a deployment in progress",
        LATENCY: "pet-object-detection: average model latency above 5000 ms; rolls back a deployment in progress"}
    for alarm in found.values():
        assert sorted(alarm["Dimensions"], key=lambda d: d["Name"]) == VARIANT
        assert {"Key": "project", "Value": "pet-object-detection"} in \
            cloudwatch.list_tags_for_resource(ResourceARN=alarm["AlarmArn"])["Tags"]


def test_a_second_deploy_refreshes_the_alarms_in_place(cloudwatch):
    guardrails.ensure_alarms(cloudwatch, deploy_cfg(), "AllTraffic")
    guardrails.ensure_alarms(cloudwatch, deploy_cfg(alarms__max_model_latency_ms=250, alarms__max_5xx_errors=3,
                                                    alarms__period_s=120, alarms__evaluation_periods=1), "AllTraffic")
    found = alarms(cloudwatch)
    assert sorted(found) == [ERRORS, LATENCY]
    assert [(found[n]["Threshold"], found[n]["Period"], found[n]["EvaluationPeriods"]) for n in (ERRORS, LATENCY)] \
        == [(3.0, 120, 1), (250_000.0, 120, 1)]


def test_only_the_projects_alarms_are_found_and_deleted(cloudwatch):
    guardrails.ensure_alarms(cloudwatch, deploy_cfg(endpoint_name="theirs", project_tag="other-team"),
                             "AllTraffic")
    cloudwatch.put_metric_alarm(AlarmName=ERRORS, Namespace="AWS/SageMaker", MetricName="Invocation5XXErrors",
                                Statistic="Sum", Period=60, EvaluationPeriods=1, Threshold=1.0,
                                ComparisonOperator="GreaterThanThreshold")  # our name, not our tag
    guardrails.ensure_alarms(cloudwatch, deploy_cfg(alarms__max_5xx_errors=2), "AllTraffic")
    untagged_then_tagged = alarms(cloudwatch)[ERRORS]["Threshold"]
    assert untagged_then_tagged == 2.0  # put_metric_alarm replaced it, and tagged it
    assert guardrails.delete_alarms(cloudwatch, deploy_cfg()) == [ERRORS, LATENCY]
    assert sorted(alarms(cloudwatch)) == ["theirs-5xx-errors", "theirs-model-latency"]
    assert guardrails.delete_alarms(cloudwatch, deploy_cfg()) == []


ROUTING = {
    "all_at_once": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 300},
    "canary": {"Type": "CANARY", "WaitIntervalInSeconds": 300, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20}},
    "linear": {"Type": "LINEAR", "WaitIntervalInSeconds": 300,
               "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 20}},
}


@pytest.mark.parametrize("traffic", sorted(ROUTING))
def test_each_rollout_is_sagemakers_blue_green_policy_rolled_back_on_the_alarms(traffic):
    cfg = deploy_cfg(rollout__traffic=traffic, rollout__step_percent=20)
    assert guardrails.deployment_config(cfg, [ERRORS, LATENCY]) == {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": ROUTING[traffic], "TerminationWaitInSeconds": 120,
                                  "MaximumExecutionTimeoutInSeconds": 3600},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": ERRORS}, {"AlarmName": LATENCY}]}}


def test_the_default_rollout_is_a_canary_of_half_the_capacity():
    routing = guardrails.deployment_config(deploy_cfg(), [ERRORS])["BlueGreenUpdatePolicy"]
    assert routing["TrafficRoutingConfiguration"]["CanarySize"] == {"Type": "CAPACITY_PERCENT", "Value": 50}
    assert guardrails.describe_rollout(deploy_cfg()) == (
        f"blue/green, a canary of 50% first, 300 s baking per step, rolled back by SageMaker if {ERRORS} or "
        f"{LATENCY} fires")


@pytest.mark.parametrize("traffic, steps", [("all_at_once", "all traffic at once"),
                                            ("canary", "a canary of 20% first"), ("linear", "steps of 20%")])
def test_deploy_says_how_the_traffic_moves(traffic, steps):
    cfg = deploy_cfg(rollout__traffic=traffic, rollout__step_percent=20, rollout__wait_interval_s=600)
    assert guardrails.describe_rollout(cfg) == (f"blue/green, {steps}, 600 s baking per step, rolled back by "
                                                f"SageMaker if {ERRORS} or {LATENCY} fires")
