"""tests/moto_server.py: each moto server a test starts holds no AWS resources, whatever a test
before it on the same worker made."""

from __future__ import annotations

import boto3

from tests.moto_server import moto_server

REGION = {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def test_a_new_server_starts_without_what_the_last_one_held():
    with moto_server(REGION):
        boto3.client("s3").create_bucket(Bucket="left-behind")
        assert [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]] == ["left-behind"]
    with moto_server(REGION):
        assert boto3.client("s3").list_buckets()["Buckets"] == []
