"""``make batch INPUT=s3://... OUTPUT=s3://...``: a SageMaker Batch Transform job on the
deployed model, with raw image bodies.

The job runs the model the endpoint serves now (either image kind: our nginx turns raw
image bodies into the REST request, AWS's image does it in ``code/inference.py``). Each
object under the input prefix is one request (``deploy.transform.split_type`` None,
``content_type`` application/x-image); SageMaker writes ``<output>/<object key>.out``, the
JSON the endpoint would answer. Settings: ``deploy.transform``. The job carries the
project tag; it stops by itself when it is done (Batch Transform bills only while it runs).

``TransformWatcher`` is the seam around waiting for the job: moto completes every job at
creation, so a failure is tested there.

    python -m detkit.cloud.transform s3://bucket/in/ s3://bucket/out/ [KEY=VALUE ...]
"""

from __future__ import annotations

import sys
from typing import Any

from detkit.cloud import aws
from detkit.cloud.deploy import VARIANT, DeployError, describe_endpoint, resource_name
from detkit.config.cli import command_parser, load, run_command


class TransformWatcher:
    """Wait for a transform job to end; its description."""

    def __init__(self, sagemaker, wait_minutes: float):
        self.sagemaker = sagemaker
        self.wait_minutes = wait_minutes

    def wait(self, name: str) -> dict[str, Any]:
        aws.wait(self.sagemaker, "transform_job_completed_or_stopped", 30, self.wait_minutes, TransformJobName=name)
        return self.sagemaker.describe_transform_job(TransformJobName=name)


def deployed_model(sagemaker, endpoint: str) -> str:
    """The model behind the endpoint's variant now."""
    described = describe_endpoint(sagemaker, endpoint)
    if described is None:
        raise DeployError(f"no endpoint {endpoint}: batch transform runs the deployed model; run make deploy first")
    config = sagemaker.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
    variants = {v["VariantName"]: v["ModelName"] for v in config["ProductionVariants"]}
    return variants.get(VARIANT, next(iter(variants.values())))


def job_request(cfg, name: str, model: str, input_uri: str, output_uri: str) -> dict[str, Any]:
    """``create_transform_job``'s arguments from ``deploy.transform``."""
    t = cfg.transform
    request = {
        "TransformJobName": name, "ModelName": model, "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": int(t.max_payload_mb),
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
                           "ContentType": t.content_type, "SplitType": t.split_type, "CompressionType": "None"},
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": "application/json", "AssembleWith": "None"},
        "TransformResources": {"InstanceType": t.instance_type, "InstanceCount": int(t.instance_count)},
        "Tags": aws.project_tags(cfg.project_tag),
    }
    if t.max_concurrent_transforms is not None:  # else SageMaker asks the container's /execution-parameters
        request["MaxConcurrentTransforms"] = int(t.max_concurrent_transforms)
    return request


def check_form(input_uri: str, output_uri: str) -> None:
    for label, uri in (("INPUT", input_uri), ("OUTPUT", output_uri)):
        try:
            bucket, _ = aws.split_s3_uri(uri)
        except ValueError:
            bucket = ""
        if not bucket:
            raise DeployError(f"{label}={uri}: expected s3://bucket/prefix (Batch Transform reads and writes S3; "
                              "local folders, both INPUT and OUTPUT: python -m detkit.serve.batch)")


def check_uris(s3, input_uri: str, output_uri: str) -> None:
    check_form(input_uri, output_uri)
    bucket, prefix = aws.split_s3_uri(input_uri)
    listed = aws.unless_missing(s3.list_objects_v2, "NoSuchBucket", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    if listed is None:
        raise DeployError(f"INPUT={input_uri}: there is no bucket {bucket}")
    if not listed.get("KeyCount"):
        raise DeployError(f"INPUT={input_uri}: no objects under this prefix; upload the images first "
                          f"(aws s3 sync <folder> {input_uri})")


def run(cfg, clients: dict[str, Any], input_uri: str, output_uri: str, watcher: TransformWatcher) -> dict[str, Any]:
    """Start the job on the deployed model, wait for it, report; its final description."""
    sagemaker = clients["sagemaker"]
    check_uris(clients["s3"], input_uri, output_uri)
    model = deployed_model(sagemaker, cfg.endpoint_name)
    name = resource_name(cfg.endpoint_name, "batch")
    t = cfg.transform
    sagemaker.create_transform_job(**job_request(cfg, name, model, input_uri, output_uri))
    hourly = cfg.instances[t.instance_type].hourly_usd
    print(f"batch: started transform job {name}: model {model} on {t.instance_count} x {t.instance_type} "
          f"(${hourly * t.instance_count:.2f}/hour while it runs), {input_uri} -> {output_uri}")
    described = watcher.wait(name)
    state = described["TransformJobStatus"]
    if state == "Completed":
        took = described.get("TransformEndTime"), described.get("TransformStartTime")
        seconds = f" in {(took[0] - took[1]).total_seconds():.0f} s" if all(took) else ""
        print(f"batch: transform job {name} Completed{seconds}: one JSON answer per image at "
              f"{output_uri.rstrip('/')}/<image key>.out")
        return described
    if state in ("Failed", "Stopped"):
        raise DeployError(f"transform job {name} ended {state}: {described.get('FailureReason', 'no reason given')}; "
                          f"its logs: CloudWatch log group /aws/sagemaker/TransformJobs, streams {name}/*")
    raise DeployError(f"transform job {name} is still {state} after {t.wait_minutes} minutes; it goes on: "
                      f"aws sagemaker describe-transform-job --transform-job-name {name}")


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("detkit.cloud.transform", __doc__)
    parser.add_argument("input", help="s3://bucket/prefix: each object under it is one request")
    parser.add_argument("output", help="s3://bucket/prefix for the answers (<object key>.out)")

    def transform(args) -> None:
        cfg = load(args).deploy
        check_form(args.input, args.output)  # before any AWS client
        try:
            sagemaker, s3 = aws.clients(cfg.region, "sagemaker", "s3")
            run(cfg, {"sagemaker": sagemaker, "s3": s3}, args.input, args.output,
                TransformWatcher(sagemaker, cfg.transform.wait_minutes))
        except aws.call_errors() as exc:
            raise DeployError(f"AWS ({cfg.region}): {exc}") from None

    return run_command(parser, argv, transform, errors=(DeployError,))


if __name__ == "__main__":
    sys.exit(main())
