"""SageMaker deployment from Make: the last mile that is often done by hand in the console.

    python -m detkit.deploy deploy     # gate, build + push to ECR, model, endpoint config, endpoint
    python -m detkit.deploy status     # the endpoint and this project's models and configs
    python -m detkit.deploy invoke IMAGE [--out ...]   # boto3 invoke_endpoint with the REST body
    python -m detkit.deploy undeploy   # delete the endpoint, configs and models this project made

Settings come from the ``deploy`` config group (``conf/deploy/sagemaker.yaml``) and the
environment it names; credentials come from boto3's usual chain and are never printed or
written (the ECR password goes to ``docker login`` on stdin). Every resource created here
carries the tag ``project=<deploy.project_tag>``; ``undeploy`` deletes only those.

``deploy`` refuses a model whose ``metrics/eval.json`` AP50 is below ``deploy.min_ap50`` or
whose export check failed. An update that ends in ``Failed`` is rolled back to the
previous endpoint config. ``EndpointSwitch`` is the one seam around the calls that change
a live endpoint (create, update, wait), so that logic is tested against moto, which has no
``update_endpoint``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detkit import aws
from detkit.cli import stage_parser
from detkit.config import ConfigError, load_config, repo_root
from detkit.fsio import EXPORT_CHECK

VARIANT = "AllTraffic"


class DeployError(RuntimeError):
    """A refusal or failure, phrased for the user."""


@dataclass
class Settings:
    """What a deploy needs: the ``deploy`` config group plus the packaged model's paths."""

    cfg: Any  # the composed config's ``deploy`` node
    model_name: str  # export.model_name: TF Serving's model name inside the image
    context: Path | None  # docker build context (package stage); deploy only
    metrics: Path | None  # metrics/eval.json (eval stage); deploy only

    @property
    def tags(self) -> list[dict[str, str]]:
        return aws.project_tags(self.cfg.project_tag)


# ---------------------------------------------------------------------------- docker


class DockerEngine:
    """The docker CLI. Build, log in (password on stdin), push."""

    @staticmethod
    def available() -> bool:
        if not shutil.which("docker"):
            return False
        return subprocess.run(["docker", "info"], capture_output=True).returncode == 0

    def build(self, context: Path, image: str) -> None:
        subprocess.run(["docker", "build", "-t", image, str(context)], check=True)

    def login(self, registry: str, username: str, password: str) -> None:
        subprocess.run(["docker", "login", "--username", username, "--password-stdin", registry],
                       input=password.encode(), check=True, stdout=subprocess.DEVNULL)

    def push(self, image: str) -> None:
        subprocess.run(["docker", "push", image], check=True)


# ---------------------------------------------------------------------------- the endpoint seam


class EndpointSwitch:
    """Create, update and wait for a live endpoint: the calls moto cannot emulate."""

    def __init__(self, sagemaker, wait_minutes: int):
        self.sagemaker = sagemaker
        self.wait_minutes = wait_minutes

    def create(self, endpoint: str, config: str, tags: list[dict[str, str]]) -> None:
        self.sagemaker.create_endpoint(EndpointName=endpoint, EndpointConfigName=config, Tags=tags)

    def update(self, endpoint: str, config: str) -> None:
        self.sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=config)

    def wait(self, endpoint: str) -> dict[str, Any]:
        """Wait for InService (or a final failure); the endpoint's description either way."""
        # Failed, or still updating after wait_minutes: the description says which.
        aws.wait(self.sagemaker, "endpoint_in_service", 30, self.wait_minutes, EndpointName=endpoint)
        return self.sagemaker.describe_endpoint(EndpointName=endpoint)


# ---------------------------------------------------------------------------- helpers


def describe_endpoint(sagemaker, endpoint: str) -> dict[str, Any] | None:
    # SageMaker answers a missing endpoint with ValidationException ("Could not find endpoint").
    return aws.unless_missing(sagemaker.describe_endpoint, "ValidationException", EndpointName=endpoint)


def quality_gate(settings: Settings) -> dict[str, Any]:
    """Refuse models below ``min_ap50`` or with a failed export check; the package manifest."""
    if not settings.metrics.is_file():
        raise DeployError(f"{settings.metrics}: missing; run the eval stage (dvc repro) before deploying")
    ap50 = json.loads(settings.metrics.read_text())["AP50"]
    if ap50 < settings.cfg.min_ap50:
        raise DeployError(f"refused: val AP50 {ap50:.3f} in {settings.metrics} is below deploy.min_ap50 "
                          f"{settings.cfg.min_ap50}")
    manifest_path = settings.context / "package.json"
    if not manifest_path.is_file():
        raise DeployError(f"{manifest_path}: missing; run the package stage (dvc repro) before deploying")
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("export_check_passed"):
        raise DeployError(f"refused: the export check of {manifest['model_name']} version {manifest['version']} "
                          f"failed (see {Path(manifest['export']) / EXPORT_CHECK})")
    return {**manifest, "ap50": ap50}


def image_tag(settings: Settings) -> str:
    if settings.cfg.image_tag:
        return str(settings.cfg.image_tag)
    root = repo_root()
    revision = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.strip()
    # An immutable tag must name what is in the image: uncommitted changes get a time stamp too.
    return f"{revision}-dirty-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}" if dirty else revision


def resource_name(endpoint: str, tag: str) -> str:
    """SageMaker names: at most 63 of [a-zA-Z0-9-]; a time stamp keeps every deploy's own."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = "".join(c if c.isalnum() else "-" for c in f"{endpoint}-{tag}")
    return f"{base[:63 - len(stamp) - 1]}-{stamp}"


def ensure_repository(ecr, settings: Settings) -> str:
    """The repository's URI; created (immutable tags, scan on push) when missing."""
    name = settings.cfg.ecr_repository
    found = aws.unless_missing(ecr.describe_repositories, "RepositoryNotFoundException", repositoryNames=[name])
    if found:
        return found["repositories"][0]["repositoryUri"]
    created = ecr.create_repository(repositoryName=name, imageTagMutability="IMMUTABLE",
                                    imageScanningConfiguration={"scanOnPush": True}, tags=settings.tags)
    print(f"deploy: created ECR repository {name}")
    return created["repository"]["repositoryUri"]


def image_exists(ecr, repository: str, tag: str) -> bool:
    return aws.unless_missing(ecr.describe_images, "ImageNotFoundException", repositoryName=repository,
                           imageIds=[{"imageTag": tag}]) is not None


def push_image(ecr, docker, settings: Settings, tag: str) -> str:
    uri = ensure_repository(ecr, settings)
    image = f"{uri}:{tag}"
    if image_exists(ecr, settings.cfg.ecr_repository, tag):
        print(f"deploy: {image} is already in ECR (tags are immutable): not rebuilt")
        return image
    docker.build(settings.context, image)
    auth = ecr.get_authorization_token()["authorizationData"][0]
    username, password = base64.b64decode(auth["authorizationToken"]).decode().split(":", 1)
    docker.login(auth["proxyEndpoint"], username, password)
    docker.push(image)
    print(f"deploy: pushed {image}")
    return image


def price_line(settings: Settings) -> str:
    kind, count = settings.cfg.instance_type, settings.cfg.instance_count
    hourly = settings.cfg.hourly_usd.get(kind)
    if hourly is None:
        return f"price: {kind} is not in deploy.hourly_usd; see https://aws.amazon.com/sagemaker/pricing/"
    total = hourly * count
    return (f"price: {kind} at ${hourly:.4g}/hour (us-east-1 list price) x {count} = ${total:.2f}/hour, "
            f"about ${total * 24 * 30:.0f}/month, billed until `make undeploy`")


# ---------------------------------------------------------------------------- commands


def deploy(settings: Settings, sagemaker, ecr, docker, switch: EndpointSwitch) -> dict[str, Any]:
    """Gate, push, then a new model + endpoint config, and create or switch the endpoint."""
    manifest = quality_gate(settings)
    if not settings.cfg.role_arn:
        raise DeployError("deploy.role_arn is not set: export SAGEMAKER_ROLE_ARN=<the IAM role SageMaker assumes>")
    print(f"deploy: {manifest['model_name']} version {manifest['version']}, val AP50 {manifest['ap50']:.3f} "
          f">= {settings.cfg.min_ap50}, export check passed")
    tag = image_tag(settings)
    image = push_image(ecr, docker, settings, tag)
    endpoint = settings.cfg.endpoint_name
    model = resource_name(endpoint, tag)
    sagemaker.create_model(ModelName=model, ExecutionRoleArn=settings.cfg.role_arn, Tags=settings.tags,
                           PrimaryContainer={"Image": image, "Environment": {"MODEL_NAME": settings.model_name}})
    config = model  # one endpoint config per model, named alike
    sagemaker.create_endpoint_config(EndpointConfigName=config, Tags=settings.tags, ProductionVariants=[{
        "VariantName": VARIANT, "ModelName": model, "InstanceType": settings.cfg.instance_type,
        "InitialInstanceCount": int(settings.cfg.instance_count), "InitialVariantWeight": 1.0}])
    existing = describe_endpoint(sagemaker, endpoint)
    previous = existing["EndpointConfigName"] if existing else None
    if existing:
        print(f"deploy: updating endpoint {endpoint}: {previous} -> {config}")
        switch.update(endpoint, config)
    else:
        print(f"deploy: creating endpoint {endpoint} with {config}")
        switch.create(endpoint, config, settings.tags)
    state = switch.wait(endpoint)
    if state["EndpointStatus"] != "InService" or state["EndpointConfigName"] != config:
        reason = state.get("FailureReason") or state["EndpointStatus"]
        if previous is None:
            raise DeployError(f"endpoint {endpoint} did not come up ({reason}); `make undeploy` removes what is left")
        print(f"deploy: the update failed ({reason}); rolling back to {previous}")
        switch.update(endpoint, previous)
        after = switch.wait(endpoint)
        raise DeployError(f"the update to {config} failed ({reason}); rolled back: endpoint {endpoint} is "
                          f"{after['EndpointStatus']} with {after['EndpointConfigName']}")
    print(f"deploy: endpoint {endpoint} is InService with {config}")
    print(f"invoke: make invoke IMAGE=cat.jpg   (boto3 sagemaker-runtime invoke_endpoint, region "
          f"{settings.cfg.region})")
    print(price_line(settings))
    return {"endpoint": endpoint, "config": config, "model": model, "image": image, "previous": previous}


def ours(sagemaker, arn: str, settings: Settings) -> bool:
    return aws.tagged_with(sagemaker, arn, settings.tags)


def project_resources(sagemaker, settings: Settings) -> dict[str, list[str]]:
    """This project's endpoint configs and models (by tag), newest first."""
    def tagged(operation: str, kind: str) -> list[str]:
        pages = sagemaker.get_paginator(f"list_{operation}").paginate(SortBy="CreationTime", SortOrder="Descending")
        return [item[f"{kind}Name"] for page in pages for item in page[f"{kind}s"]
                if ours(sagemaker, item[f"{kind}Arn"], settings)]

    return {"endpoint_configs": tagged("endpoint_configs", "EndpointConfig"), "models": tagged("models", "Model")}


def status(settings: Settings, sagemaker) -> None:
    endpoint = describe_endpoint(sagemaker, settings.cfg.endpoint_name)
    if endpoint is None:
        print(f"status: no endpoint {settings.cfg.endpoint_name} in {settings.cfg.region} (nothing billed for it)")
    else:
        print(f"status: endpoint {endpoint['EndpointName']}: {endpoint['EndpointStatus']}, config "
              f"{endpoint['EndpointConfigName']}" + (f", failure: {endpoint['FailureReason']}"
                                                     if endpoint.get("FailureReason") else ""))
    resources = project_resources(sagemaker, settings)
    print(f"status: this project's endpoint configs: {', '.join(resources['endpoint_configs']) or 'none'}")
    print(f"status: this project's models: {', '.join(resources['models']) or 'none'}")


def undeploy(settings: Settings, sagemaker) -> None:
    """Delete the endpoint (if this project made it), then this project's configs and models."""
    name = settings.cfg.endpoint_name
    endpoint = describe_endpoint(sagemaker, name)
    if endpoint is not None:
        if not ours(sagemaker, endpoint["EndpointArn"], settings):
            raise DeployError(f"endpoint {name} was not created by this project (no project="
                              f"{settings.cfg.project_tag} tag): not touched")
        sagemaker.delete_endpoint(EndpointName=name)
        if not aws.wait(sagemaker, "endpoint_deleted", 15, 20, EndpointName=name):
            raise DeployError(f"endpoint {name} is still not deleted after 20 minutes; `make status` shows it")
        print(f"undeploy: deleted endpoint {name}: billing for it stops")
    resources = project_resources(sagemaker, settings)
    for config in resources["endpoint_configs"]:
        sagemaker.delete_endpoint_config(EndpointConfigName=config)
    for model in resources["models"]:
        sagemaker.delete_model(ModelName=model)
    print(f"undeploy: deleted {len(resources['endpoint_configs'])} endpoint configs and {len(resources['models'])} "
          "models of this project (the ECR images stay: they cost storage only)")


def invoker(runtime, endpoint: str) -> Callable[[str], dict[str, Any]]:
    """``send`` for ``detkit.predict.run_client``: ``invoke_endpoint`` with the body of docs/export.md."""
    from botocore.exceptions import BotoCoreError, ClientError

    from detkit.predict import PredictError, parse_response

    def send(body: str) -> dict[str, Any]:
        try:
            response = runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json", Body=body)
        except (ClientError, BotoCoreError) as exc:
            raise PredictError(f"endpoint {endpoint}: {exc}") from exc
        return parse_response(f"endpoint {endpoint}", 200, response["Body"].read())

    return send


# ---------------------------------------------------------------------------- CLI


def clients(region: str) -> tuple[Any, Any, Any]:
    return aws.clients(region, "sagemaker", "ecr", "sagemaker-runtime")


def main(argv: list[str] | None = None) -> int:
    from detkit.predict import client_arguments, run_client

    parser = stage_parser("detkit.deploy", __doc__, overrides=False)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. deploy.instance_type=ml.c5.large (repeatable)")
    commands = parser.add_subparsers(dest="command", required=True)
    deploying = commands.add_parser("deploy", help="gate, push, create or update the endpoint, wait for InService")
    deploying.add_argument("--context", type=Path, required=True, help="the package stage's docker build context")
    deploying.add_argument("--metrics", type=Path, required=True, help="the eval stage's eval.json")
    commands.add_parser("status", help="the endpoint and this project's models and configs")
    client_arguments(commands.add_parser("invoke", help="send an image with invoke_endpoint"))
    commands.add_parser("undeploy", help="delete the endpoint, configs and models this project created")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params, overrides=args.set)
        settings = Settings(cfg.deploy, cfg.export.model_name, getattr(args, "context", None),
                            getattr(args, "metrics", None))
        docker = DockerEngine()
        if args.command == "deploy" and not docker.available():  # before any AWS client is made
            raise DeployError("no Docker engine here: `make deploy` builds and pushes the serving image with "
                              "docker; run it where `docker info` works")
        sagemaker, ecr, runtime = clients(cfg.deploy.region)
        if args.command == "deploy":
            deploy(settings, sagemaker, ecr, docker, EndpointSwitch(sagemaker, cfg.deploy.wait_minutes))
        elif args.command == "status":
            status(settings, sagemaker)
        elif args.command == "invoke":
            return run_client(args, invoker(runtime, cfg.deploy.endpoint_name))
        else:
            undeploy(settings, sagemaker)
    except (ConfigError, DeployError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
