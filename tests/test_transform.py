"""detkit.cloud.transform (make batch on S3 prefixes) against moto's server on 127.0.0.1: the Batch
Transform request as configured, on the deployed model. moto completes every transform job at
creation, so a failed job comes through the module's seam (``TransformWatcher``)."""

from __future__ import annotations

import pytest

from detkit.cloud import deploy, transform
from detkit.config import load_config
from harness.repo_copy import make
from tests.test_deploy import BUCKET, RecordingDocker, aws, moto_url, packaged, settings_for

pytestmark = pytest.mark.slow
__all__ = ["aws", "moto_url", "packaged"]  # fixtures shared with test_deploy

INPUT = f"s3://{BUCKET}/batch/in/"
OUTPUT = f"s3://{BUCKET}/batch/out/"


@pytest.fixture
def deployed(aws, packaged, val_examples):
    """The demo model deployed on AWS's image, and two images under the input prefix."""
    result = deploy.deploy(settings_for(packaged, "deploy.image=aws"), aws, RecordingDocker(),
                           deploy.EndpointSwitch(aws["sagemaker"], wait_minutes=1))
    for i, example in enumerate(val_examples[:2]):
        aws["s3"].put_object(Bucket=BUCKET, Key=f"batch/in/pet-{i}.jpg", Body=example["encoded"])
    return result


class FailingWatcher(transform.TransformWatcher):
    """A job that ends as one whose container refused the records."""

    def wait(self, name):
        return {**super().wait(name), "TransformJobStatus": "Failed",
                "FailureReason": "ClientError: See job logs for more information"}


def test_job_runs_the_deployed_model_on_the_prefix_as_configured(aws, deployed, capsys):
    cfg = load_config(overrides=["deploy.transform.instance_count=2", "deploy.transform.max_concurrent_transforms=4"])
    described = transform.run(cfg.deploy, aws, INPUT, OUTPUT, transform.TransformWatcher(aws["sagemaker"], 1))
    job = aws["sagemaker"].describe_transform_job(TransformJobName=described["TransformJobName"])
    assert job["ModelName"] == deployed["model"]
    assert job["TransformInput"]["DataSource"]["S3DataSource"] == {"S3DataType": "S3Prefix", "S3Uri": INPUT}
    assert (job["TransformInput"]["ContentType"], job["TransformInput"]["SplitType"]) == ("application/x-image",
                                                                                          "None")
    assert job["TransformOutput"]["S3OutputPath"] == OUTPUT and job["TransformOutput"]["Accept"] == "application/json"
    assert job["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 2}
    assert (job["BatchStrategy"], job["MaxPayloadInMB"], job["MaxConcurrentTransforms"]) == ("SingleRecord", 6, 4)
    tags = aws["sagemaker"].list_tags(ResourceArn=job["TransformJobArn"])["Tags"]
    assert {"Key": "project", "Value": "pet-object-detection"} in tags
    out = capsys.readouterr().out
    assert "Completed" in out and f"{OUTPUT.rstrip('/')}/<image key>.out" in out and "$0.23/hour" in out


def test_a_failed_job_says_why_and_where_its_logs_are(aws, deployed):
    cfg = load_config().deploy
    with pytest.raises(deploy.DeployError, match=r"ended Failed: ClientError: See job logs .*"
                                                 r"/aws/sagemaker/TransformJobs"):
        transform.run(cfg, aws, INPUT, OUTPUT, FailingWatcher(aws["sagemaker"], 1))


def test_without_an_endpoint_or_images_nothing_starts(aws, packaged):
    cfg = load_config().deploy
    watcher = transform.TransformWatcher(aws["sagemaker"], 1)
    with pytest.raises(deploy.DeployError, match=f"INPUT={INPUT}: no objects under this prefix"):
        transform.run(cfg, aws, INPUT, OUTPUT, watcher)
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/pet.jpg", Body=b"\xff\xd8\xff")
    with pytest.raises(deploy.DeployError, match="no endpoint pet-object-detection: .* run make deploy first"):
        transform.run(cfg, aws, INPUT, OUTPUT, watcher)
    assert aws["sagemaker"].list_transform_jobs()["TransformJobSummaries"] == []


def test_make_batch_on_s3_prefixes_from_a_users_shell(aws, deployed, demo_repo):
    result = make(demo_repo, "batch", f"INPUT={INPUT}", f"OUTPUT={OUTPUT}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch: started transform job pet-object-detection-batch-" in result.stdout
    assert "Completed" in result.stdout
    jobs = aws["sagemaker"].list_transform_jobs()["TransformJobSummaries"]
    assert [j["TransformJobStatus"] for j in jobs] == ["Completed"]
