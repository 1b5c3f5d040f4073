"""Target-tracking autoscaling of the endpoint's variant through Application Auto Scaling
(``deploy.autoscaling``): the variant's instance count follows
``SageMakerVariantInvocationsPerInstance`` (invocations per instance per minute) within
``min_instances`` .. ``max_instances``. Applied by deploy, removed by undeploy (before the
endpoint: a scalable target must not outlive it), shown by status.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC = "SageMakerVariantInvocationsPerInstance"


def resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def apply(client, cfg, variant: str) -> str:
    """Register the variant and put its policy (both idempotent); a line for the user."""
    a = cfg.autoscaling
    target = resource_id(cfg.endpoint_name, variant)
    client.register_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=target, ScalableDimension=DIMENSION,
                                    MinCapacity=int(a.min_instances), MaxCapacity=int(a.max_instances))
    client.put_scaling_policy(
        PolicyName=policy_name(cfg.endpoint_name), ServiceNamespace=NAMESPACE, ResourceId=target,
        ScalableDimension=DIMENSION, PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": float(a.target_invocations_per_instance),
            "PredefinedMetricSpecification": {"PredefinedMetricType": METRIC},
            "ScaleInCooldown": int(a.scale_in_cooldown_s), "ScaleOutCooldown": int(a.scale_out_cooldown_s)})
    return (f"autoscaling: {a.min_instances}-{a.max_instances} instances, holding "
            f"{a.target_invocations_per_instance:g} invocations per instance per minute (cool-downs: scale-in "
            f"{a.scale_in_cooldown_s} s, scale-out {a.scale_out_cooldown_s} s)")


def describe(client, endpoint: str, variant: str) -> dict[str, Any] | None:
    """The scalable target and its policies, or None when the variant is not registered."""
    target = resource_id(endpoint, variant)
    targets = client.describe_scalable_targets(ServiceNamespace=NAMESPACE, ResourceIds=[target],
                                               ScalableDimension=DIMENSION)["ScalableTargets"]
    if not targets:
        return None
    policies = client.describe_scaling_policies(ServiceNamespace=NAMESPACE, ResourceId=target,
                                                ScalableDimension=DIMENSION)["ScalingPolicies"]
    return {"target": targets[0], "policies": policies}


def remove(client, endpoint: str, variant: str) -> bool:
    """Delete the variant's policies and deregister it; whether there was anything to remove."""
    found = describe(client, endpoint, variant)
    if found is None:
        return False
    target = resource_id(endpoint, variant)
    for policy in found["policies"]:
        client.delete_scaling_policy(PolicyName=policy["PolicyName"], ServiceNamespace=NAMESPACE,
                                     ResourceId=target, ScalableDimension=DIMENSION)
    client.deregister_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=target, ScalableDimension=DIMENSION)
    return True


def status_line(found: dict[str, Any] | None) -> str:
    if found is None:
        return "autoscaling: none (the endpoint keeps its instance count)"
    target = found["target"]
    def described(policy: dict[str, Any]) -> str:
        tracking = policy["TargetTrackingScalingPolicyConfiguration"]
        # A policy put without them (not by deploy) has Application Auto Scaling's own cool-downs.
        cooldowns = " / ".join(f"{way} {tracking[key]} s" if key in tracking else f"{way} AWS's default"
                               for way, key in (("in", "ScaleInCooldown"), ("out", "ScaleOutCooldown")))
        return (f"{policy['PolicyName']} (target {tracking['TargetValue']:g} "
                f"{tracking['PredefinedMetricSpecification']['PredefinedMetricType']}, cool-downs {cooldowns})")

    policies = ", ".join(described(p) for p in found["policies"]) or "no policy"
    return f"autoscaling: {target['MinCapacity']}-{target['MaxCapacity']} instances, {policies}"
