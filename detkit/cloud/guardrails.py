"""SageMaker deployment guardrails for an update of a live endpoint: the blue/green
``DeploymentConfig`` from ``deploy.rollout`` and the CloudWatch alarms (``deploy.alarms``)
whose ALARM state makes SageMaker roll the update back on its own.

Two alarms per endpoint, on its variant's metrics in ``AWS/SageMaker``:

- ``<endpoint>-5xx-errors``: ``Invocation5XXErrors`` summed per period >= ``max_5xx_errors``;
- ``<endpoint>-model-latency``: ``ModelLatency`` (microseconds) averaged per period above
  ``max_model_latency_ms``.

Both carry the project tag; missing data is not breaching (an idle endpoint is healthy).
"""

from __future__ import annotations

from typing import Any

from detkit.cloud import aws

TRAFFIC_TYPES = {"all_at_once": "ALL_AT_ONCE", "canary": "CANARY", "linear": "LINEAR"}


def alarm_names(endpoint: str) -> list[str]:
    return [f"{endpoint}-5xx-errors", f"{endpoint}-model-latency"]


def alarm_requests(cfg, variant: str) -> list[dict[str, Any]]:
    """``put_metric_alarm`` arguments for ``cfg`` (the deploy group), one per alarm."""
    a = cfg.alarms
    dimensions = [{"Name": "EndpointName", "Value": cfg.endpoint_name}, {"Name": "VariantName", "Value": variant}]
    common = {"Namespace": "AWS/SageMaker", "Dimensions": dimensions, "Period": int(a.period_s),
              "EvaluationPeriods": int(a.evaluation_periods), "TreatMissingData": "notBreaching",
              "Tags": aws.project_tags(cfg.project_tag)}
    errors, latency = alarm_names(cfg.endpoint_name)
    return [
        {**common, "AlarmName": errors, "MetricName": "Invocation5XXErrors", "Statistic": "Sum",
         "Threshold": float(a.max_5xx_errors), "ComparisonOperator": "GreaterThanOrEqualToThreshold",
         "AlarmDescription": f"{cfg.endpoint_name}: the model answered 5XX; rolls back a deployment in progress"},
        {**common, "AlarmName": latency, "MetricName": "ModelLatency", "Statistic": "Average",
         "Threshold": float(a.max_model_latency_ms) * 1000.0, "ComparisonOperator": "GreaterThanThreshold",
         "AlarmDescription": f"{cfg.endpoint_name}: average model latency above {a.max_model_latency_ms:g} ms; "
                             "rolls back a deployment in progress"},
    ]


def ensure_alarms(cloudwatch, cfg, variant: str) -> list[str]:
    """Create or refresh the endpoint's alarms (``put_metric_alarm`` replaces one of the same name)."""
    for request in alarm_requests(cfg, variant):
        cloudwatch.put_metric_alarm(**request)
    return alarm_names(cfg.endpoint_name)


def ours(cloudwatch, cfg) -> list[dict[str, Any]]:
    """The endpoint's alarms that exist and carry the project tag."""
    found = cloudwatch.describe_alarms(AlarmNames=alarm_names(cfg.endpoint_name))["MetricAlarms"]
    tags = aws.project_tags(cfg.project_tag)
    return [alarm for alarm in found
            if all(tag in cloudwatch.list_tags_for_resource(ResourceARN=alarm["AlarmArn"])["Tags"] for tag in tags)]


def delete_alarms(cloudwatch, cfg) -> list[str]:
    names = [alarm["AlarmName"] for alarm in ours(cloudwatch, cfg)]
    if names:
        cloudwatch.delete_alarms(AlarmNames=names)
    return names


def deployment_config(cfg, alarms: list[str]) -> dict[str, Any]:
    """``update_endpoint``'s ``DeploymentConfig``: blue/green as ``deploy.rollout`` says, rolled back on ``alarms``."""
    r = cfg.rollout
    routing: dict[str, Any] = {"Type": TRAFFIC_TYPES[r.traffic], "WaitIntervalInSeconds": int(r.wait_interval_s)}
    step = {"Type": "CAPACITY_PERCENT", "Value": int(r.step_percent)}
    if r.traffic == "canary":
        routing["CanarySize"] = step
    elif r.traffic == "linear":
        routing["LinearStepSize"] = step
    return {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing,
                                  "TerminationWaitInSeconds": int(r.termination_wait_s),
                                  "MaximumExecutionTimeoutInSeconds": int(r.max_execution_timeout_s)},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in alarms]},
    }


def describe_rollout(cfg) -> str:
    r = cfg.rollout
    steps = {"all_at_once": "all traffic at once", "canary": f"a canary of {r.step_percent}% first",
             "linear": f"steps of {r.step_percent}%"}[r.traffic]
    return (f"blue/green, {steps}, {r.wait_interval_s} s baking per step, rolled back by SageMaker if "
            f"{' or '.join(alarm_names(cfg.endpoint_name))} fires")
