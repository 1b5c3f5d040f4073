"""boto3 plumbing shared by deploy, SageMaker training jobs and batch jobs.

Credentials and region come from boto3's usual chain; ``AWS_ENDPOINT_URL`` (boto3's own
setting) points every client at another endpoint, e.g. moto's server in the tests. Nothing
here prints or stores credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROJECT_TAG_KEY = "project"


def session(region: str):
    import boto3

    return boto3.Session(region_name=region)


def clients(region: str, *services: str) -> tuple[Any, ...]:
    """One client per service name, all from one session."""
    made = session(region)
    return tuple(made.client(service) for service in services)


def project_tags(value: str) -> list[dict[str, str]]:
    """The tag every resource this project creates carries (and the only ones it deletes)."""
    return [{"Key": PROJECT_TAG_KEY, "Value": value}]


def error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def unless_missing(call: Callable[..., Any], missing_code: str, **kwargs) -> Any | None:
    """``call(**kwargs)``, or None where AWS answers ``missing_code``: the thing does not exist."""
    from botocore.exceptions import ClientError

    try:
        return call(**kwargs)
    except ClientError as exc:
        if error_code(exc) == missing_code:
            return None
        raise


def wait(client, waiter: str, delay: int, minutes: float, **kwargs) -> bool:
    """boto3 waiter ``waiter`` for up to ``minutes``; False where it ended in a failure state or timed out."""
    from botocore.exceptions import WaiterError

    try:
        client.get_waiter(waiter).wait(**kwargs, WaiterConfig={"Delay": delay,
                                                               "MaxAttempts": max(1, int(minutes * 60 // delay))})
    except WaiterError:
        return False
    return True


def tagged_with(sagemaker, arn: str, tags: list[dict[str, str]]) -> bool:
    """Whether the SageMaker resource ``arn`` carries every tag in ``tags``."""
    found = sagemaker.list_tags(ResourceArn=arn).get("Tags", [])
    return all(tag in found for tag in tags)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not uri.startswith("s3://") or "/" not in uri[len("s3://"):]:
        raise ValueError(f"not an S3 object URI: {uri}")
    bucket, key = uri[len("s3://"):].split("/", 1)
    return bucket, key
