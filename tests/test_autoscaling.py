"""detkit.cloud.autoscaling against moto's Application Auto Scaling on 127.0.0.1: the scalable
target and target-tracking policy of docs/deploy.md, applied twice, shown and removed."""

from __future__ import annotations

import copy

import pytest
from omegaconf import OmegaConf

from detkit.cloud import autoscaling, aws
from detkit.config import load_config
from tests.moto_server import moto_server, reset

REGION = "us-east-1"
RESOURCE = "endpoint/pet-object-detection/variant/AllTraffic"


@pytest.fixture(scope="module")
def moto_url():
    with moto_server({"AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION}) as url:
        yield url


@pytest.fixture
def scaling(moto_url):
    reset(moto_url)
    return aws.clients(REGION, "application-autoscaling")[0]


DEPLOY = load_config().deploy


def deploy_cfg(**changes):
    """conf/deploy/sagemaker.yaml with ``changes`` (dotted keys, ``__`` for ``.``): one config load per module."""
    cfg = copy.deepcopy(DEPLOY)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def registered(scaling) -> tuple[list, list]:
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    return ([(t["ResourceId"], t["ScalableDimension"], t["MinCapacity"], t["MaxCapacity"]) for t in targets],
            [(p["PolicyName"], p["ResourceId"], p["ScalableDimension"], p["PolicyType"],
              p["TargetTrackingScalingPolicyConfiguration"]) for p in policies])


def test_the_variant_tracks_invocations_per_instance_within_its_bounds(scaling):
    cfg = deploy_cfg(autoscaling__max_instances=4, autoscaling__target_invocations_per_instance=90,
                     autoscaling__scale_in_cooldown_s=600, autoscaling__scale_out_cooldown_s=30)
    line = autoscaling.apply(scaling, cfg, "AllTraffic")
    assert line == ("autoscaling: 1-4 instances, holding 90 invocations per instance per minute (cool-downs: "
                    "scale-in 600 s, scale-out 30 s)")
    autoscaling.apply(scaling, cfg, "AllTraffic")  # again, as every deploy does: nothing doubles
    dimension = "sagemaker:variant:DesiredInstanceCount"
    assert registered(scaling) == (
        [(RESOURCE, dimension, 1, 4)],
        [("pet-object-detection-invocations-per-instance", RESOURCE, dimension, "TargetTrackingScaling",
          {"TargetValue": 90.0, "PredefinedMetricSpecification": {
              "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
           "ScaleInCooldown": 600, "ScaleOutCooldown": 30})])
    assert autoscaling.status_line(autoscaling.describe(scaling, "pet-object-detection", "AllTraffic")) == (
        "autoscaling: 1-4 instances, pet-object-detection-invocations-per-instance (target 90 "
        "SageMakerVariantInvocationsPerInstance, cool-downs in 600 s / out 30 s)")


def test_remove_deletes_the_policy_and_target_and_then_finds_nothing(scaling):
    autoscaling.apply(scaling, deploy_cfg(), "AllTraffic")
    autoscaling.apply(scaling, deploy_cfg(endpoint_name="theirs"), "AllTraffic")
    assert autoscaling.remove(scaling, "pet-object-detection", "AllTraffic")
    assert registered(scaling)[0] == [("endpoint/theirs/variant/AllTraffic", "sagemaker:variant:DesiredInstanceCount",
                                       1, 2)]
    assert not autoscaling.remove(scaling, "pet-object-detection", "AllTraffic")
    assert autoscaling.describe(scaling, "pet-object-detection", "AllTraffic") is None
    assert autoscaling.status_line(None) == "autoscaling: none (the endpoint keeps its instance count)"


def test_status_shows_a_target_without_a_policy_and_every_policy_of_one(scaling):
    autoscaling.apply(scaling, deploy_cfg(), "AllTraffic")
    scaling.delete_scaling_policy(PolicyName="pet-object-detection-invocations-per-instance",
                                  ServiceNamespace="sagemaker", ResourceId=RESOURCE,
                                  ScalableDimension="sagemaker:variant:DesiredInstanceCount")
    found = autoscaling.describe(scaling, "pet-object-detection", "AllTraffic")
    assert autoscaling.status_line(found) == "autoscaling: 1-2 instances, no policy"
    autoscaling.apply(scaling, deploy_cfg(), "AllTraffic")
    scaling.put_scaling_policy(  # one put by hand, without cool-downs
        PolicyName="by-hand", ServiceNamespace="sagemaker", ResourceId=RESOURCE,
        ScalableDimension="sagemaker:variant:DesiredInstanceCount", PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={"TargetValue": 200.0, "PredefinedMetricSpecification": {
            "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}})
    line = autoscaling.status_line(autoscaling.describe(scaling, "pet-object-detection", "AllTraffic"))
    assert line == ("autoscaling: 1-2 instances, pet-object-detection-invocations-per-instance (target 60 "
                    "SageMakerVariantInvocationsPerInstance, cool-downs in 300 s / out 60 s), by-hand (target 200 "
                    "SageMakerVariantInvocationsPerInstance, cool-downs in AWS's default / out AWS's default)")

