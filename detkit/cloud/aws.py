"""boto3 plumbing shared by deploy, SageMaker training jobs and batch jobs.

Credentials and region come from boto3's usual chain; ``AWS_ENDPOINT_URL`` (boto3's own
setting) points every client at another endpoint, e.g. moto's server in the tests. Nothing
here prints or stores credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_TAG_KEY = "project"
# AWS Deep Learning Containers' registry account: DLC_ACCOUNT, except in the regions listed
# (as aws/deep-learning-containers documents them).
DLC_ACCOUNT = "763104351884"
DLC_ACCOUNTS = {
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-east-2": "975050140332",
    "ap-northeast-3": "364406365360", "ap-south-2": "772153158452", "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322", "ap-southeast-5": "550225433462", "ap-southeast-6": "633930458069",
    "ap-southeast-7": "590183813437", "ca-west-1": "204538143572", "eu-central-2": "380420809688",
    "eu-south-1": "692866216735", "eu-south-2": "503227376785", "il-central-1": "780543022126",
    "me-central-1": "914824155844", "me-south-1": "217643126080", "mx-central-1": "637423239942",
    "cn-north-1": "727897471807", "cn-northwest-1": "727897471807",
}


def session(region: str):
    import boto3

    return boto3.Session(region_name=region)


def clients(region: str, *services: str) -> tuple[Any, ...]:
    """One client per service name, all from one session."""
    made = session(region)
    return tuple(made.client(service) for service in services)


def dlc_image(region: str, repository: str, tag: str) -> str:
    """An AWS Deep Learning Container image URI in ``region`` (its registry account and domain)."""
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{DLC_ACCOUNTS.get(region, DLC_ACCOUNT)}.dkr.ecr.{region}.{domain}/{repository}:{tag}"


def device_of(instance_type: str) -> str:
    """``gpu`` for the accelerated SageMaker families (ml.g*, ml.p*), else ``cpu``."""
    return "gpu" if instance_type.split(".")[1][0] in "gp" else "cpu"


def put_once(s3, bucket: str, key: str, body: bytes | Path) -> bool:
    """Upload ``body`` (bytes, or a file streamed in parts) unless ``key`` exists: content-addressed keys
    name their bytes, so an existing one is the same upload. Whether it uploaded."""
    if unless_missing(s3.head_object, "404", Bucket=bucket, Key=key) is not None:
        return False
    if isinstance(body, Path):
        s3.upload_file(str(body), bucket, key)
    else:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return True


def bucket_problem(s3, bucket: str | None, where: str, region: str) -> str | None:
    """What is wrong with ``bucket`` (unset, or missing), phrased for the user; None when it is usable."""
    if not bucket:
        return f"{where}: bucket is not set: export SAGEMAKER_BUCKET=<an S3 bucket in {region}>"
    if unless_missing(s3.head_bucket, "404", Bucket=bucket) is None:
        return (f"{where}: there is no bucket {bucket}; create it in {region} (aws s3 mb s3://<name>) "
                "or point SAGEMAKER_BUCKET at one")
    return None


def project_tags(value: str) -> list[dict[str, str]]:
    """The tag every resource this project creates carries (and the only ones it deletes)."""
    return [{"Key": PROJECT_TAG_KEY, "Value": value}]


def call_errors() -> tuple[type[Exception], ...]:
    """What a boto3 call raises when AWS refuses it or cannot be reached (no credentials, no network)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


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
