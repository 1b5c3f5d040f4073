"""SageMaker deployment from Make: the last mile that is often done by hand in the console.

    python -m detkit.cloud.deploy deploy     # gate, image, model, endpoint config, alarms, endpoint, autoscaling
    python -m detkit.cloud.deploy status     # the endpoint, its alarms and autoscaling, our models and configs
    python -m detkit.cloud.deploy invoke IMAGE [--out ...]   # boto3 invoke_endpoint with the REST body
    python -m detkit.cloud.deploy undeploy   # delete what we made: autoscaling, endpoint, alarms, configs, models

Settings come from the ``deploy`` config group (``conf/deploy/sagemaker.yaml``), overridden for one
run by trailing ``KEY=VALUE`` (``... status deploy.region=eu-west-1``), and the environment it names;
credentials come from boto3's usual chain and are never printed or written (the ECR password goes
to ``docker login`` on stdin). Every resource created here carries the tag
``project=<deploy.project_tag>``; ``undeploy`` deletes only those.

``deploy.image`` picks the container: ``custom`` builds our TF Serving + nginx image and
pushes it to ECR (needs Docker); ``aws`` uploads ``build/model.tar.gz`` to S3 under its
sha256 and runs it on AWS's TensorFlow Serving inference image (no Docker).

``deploy`` refuses a model whose ``metrics/eval.json`` AP50 is below ``deploy.min_ap50`` or
whose export check failed, and sizes TF Serving's batches to the instance's memory. An
update of a live endpoint is SageMaker's blue/green deployment (``detkit.cloud.guardrails``): it
rolls back by itself when the endpoint's alarms fire or the new fleet fails; deploy reports
which config the endpoint ended on. ``EndpointSwitch`` is the one seam around the calls that
change a live endpoint (create, update, wait), so that logic is tested against moto, which
has no ``update_endpoint``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detkit.cloud import autoscaling, aws, guardrails
from detkit.config import repo_root
from detkit.config.cli import command_parser, export_folder, load, run_command
from detkit.core.fsio import EXPORT_CHECK, newest_version

VARIANT = "AllTraffic"
MAX_BATCH_SIZE = 32  # TF Serving's batch cap in our entrypoint: more adds latency, not throughput, on CPUs


class DeployError(RuntimeError):
    """A refusal or failure, phrased for the user."""


@dataclass
class Settings:
    """What a deploy needs: the ``deploy`` config group plus the packaged model's paths."""

    cfg: Any  # the composed config's ``deploy`` node
    model_name: str  # export.model_name: TF Serving's model name inside the image
    serving_gib: Any  # model.serving_gib: base and per-image memory of the served model
    context: Path | None  # docker build context (package stage); deploy only
    metrics: Path | None  # metrics/eval.json (eval stage); deploy only
    archive: Path | None = None  # build/model.tar.gz (package stage); deploy with image=aws

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

    def __init__(self, sagemaker, wait_minutes: float):
        self.sagemaker = sagemaker
        self.wait_minutes = wait_minutes

    def create(self, endpoint: str, config: str, tags: list[dict[str, str]]) -> None:
        self.sagemaker.create_endpoint(EndpointName=endpoint, EndpointConfigName=config, Tags=tags)

    def update(self, endpoint: str, config: str, deployment_config: dict[str, Any]) -> None:
        self.sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=config,
                                       DeploymentConfig=deployment_config)

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
    hourly = settings.cfg.instances[kind].hourly_usd
    total = hourly * count
    line = (f"price: {kind} at ${hourly:.4g}/hour (us-east-1 list price) x {count} = ${total:.2f}/hour, "
            f"about ${total * 24 * 30:.0f}/month, billed until `make undeploy`")
    a = settings.cfg.autoscaling
    if a.enabled and a.max_instances > count:
        line += f"; autoscaling may run up to {a.max_instances} (${hourly * a.max_instances:.2f}/hour)"
    return line


def serving_plan(settings: Settings) -> dict[str, Any]:
    """TF Serving's batch size and threads for the instance type, and the memory they may use.

    Each of ``vcpus`` batch threads may run a batch at once, so the peak is about
    ``base + vcpus x max_batch_size x per_image`` (model.serving_gib); it must stay within
    ``memory_fraction`` of the instance's memory.
    """
    kind = settings.cfg.instance_type
    instance, serving, gib = settings.cfg.instances[kind], settings.cfg.serving, settings.serving_gib
    threads, budget = int(instance.vcpus), instance.memory_gib * serving.memory_fraction
    fits = math.floor((budget - gib.base) / (threads * gib.per_image))
    if fits < 1:
        raise DeployError(f"refused: the model needs {gib.base + threads * gib.per_image:.1f} GiB to serve one image "
                          f"per batch thread ({threads}) and {kind} offers {budget:.1f} GiB "
                          f"({serving.memory_fraction:g} x {instance.memory_gib:g}); pick a larger "
                          "deploy.instance_type")
    size = serving.max_batch_size
    if size is None:
        size = min(fits, MAX_BATCH_SIZE)
    elif size > fits:
        raise DeployError(f"refused: deploy.serving.max_batch_size {size} x {threads} batch threads needs about "
                          f"{gib.base + threads * size * gib.per_image:.1f} GiB; {kind} offers {budget:.1f} GiB "
                          f"(at most {fits} fits); lower it, set it to null, or pick a larger instance type")
    peak = gib.base + threads * size * gib.per_image
    return {"max_batch_size": int(size), "threads": threads, "peak_gib": peak,
            "line": f"serving: batches of up to {size} images on {threads} batch threads: about {peak:.1f} GiB of "
                    f"{kind}'s {instance.memory_gib:g} GiB (model.serving_gib, deploy.serving)"}


def container_environment(settings: Settings, plan: dict[str, Any]) -> dict[str, str]:
    """The model container's environment: the model's name and the batching plan, as each image reads them."""
    size, threads = str(plan["max_batch_size"]), str(plan["threads"])
    if settings.cfg.image == "custom":  # serving/entrypoint.sh
        return {"MODEL_NAME": settings.model_name, "TFS_MAX_BATCH_SIZE": size, "TFS_NUM_BATCH_THREADS": threads}
    return {"SAGEMAKER_TFS_DEFAULT_MODEL_NAME": settings.model_name, "SAGEMAKER_TFS_ENABLE_BATCHING": "true",
            "SAGEMAKER_TFS_MAX_BATCH_SIZE": size, "SAGEMAKER_TFS_NUM_BATCH_THREADS": threads,
            "SAGEMAKER_TFS_BATCH_TIMEOUT_MICROS": "0", "SAGEMAKER_TFS_MAX_ENQUEUED_BATCHES": "100"}


def aws_image(settings: Settings) -> str:
    c = settings.cfg
    return aws.dlc_image(c.region, c.aws_image.repository, c.aws_image.tags[aws.device_of(c.instance_type)])


def upload_model(s3, settings: Settings, manifest: dict[str, Any]) -> str:
    """build/model.tar.gz at ``<prefix>/models/<sha256>/model.tar.gz`` (uploaded unless there); its URI."""
    c = settings.cfg
    problem = aws.bucket_problem(s3, c.bucket, f"conf/deploy/{c.name}.yaml", c.region)
    if problem:
        raise DeployError(problem)
    if not settings.archive.is_file():
        raise DeployError(f"{settings.archive}: missing; run the package stage (dvc repro) before deploying")
    with open(settings.archive, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != manifest["model_tar_gz_sha256"]:
        raise DeployError(f"{settings.archive}: its sha256 is not the one in package.json: the package stage's "
                          "outputs are out of step; run dvc repro")
    key = f"{c.prefix}/models/{digest}/model.tar.gz"
    uri = f"s3://{c.bucket}/{key}"
    if aws.put_once(s3, c.bucket, key, settings.archive):
        print(f"deploy: uploaded {settings.archive} ({settings.archive.stat().st_size / 1e6:.1f} MB) to {uri}")
    else:
        print(f"deploy: {uri} is already in S3 (same sha256): not uploaded")
    return uri


# ---------------------------------------------------------------------------- commands


def deploy(settings: Settings, clients: dict[str, Any], docker, switch: EndpointSwitch) -> dict[str, Any]:
    """Gate, image, then a new model + endpoint config, alarms, create or update the endpoint, autoscaling."""
    sagemaker, c = clients["sagemaker"], settings.cfg
    manifest = quality_gate(settings)
    if not c.role_arn:
        raise DeployError("deploy.role_arn is not set: export SAGEMAKER_ROLE_ARN=<the IAM role SageMaker assumes>")
    print(f"deploy: {manifest['model_name']} version {manifest['version']}, val AP50 {manifest['ap50']:.3f} "
          f">= {c.min_ap50}, export check passed")
    plan = serving_plan(settings)
    print(plan["line"])
    endpoint = c.endpoint_name
    existing = describe_endpoint(sagemaker, endpoint)
    if existing and not ours(sagemaker, existing["EndpointArn"], settings):
        raise DeployError(f"endpoint {endpoint} was not created by this project (no project={c.project_tag} tag): "
                          "not updated; set deploy.endpoint_name to another name")
    container: dict[str, Any] = {"Environment": container_environment(settings, plan)}
    if c.image == "custom":
        tag = image_tag(settings)
        container["Image"] = push_image(clients["ecr"], docker, settings, tag)
    else:
        container["ModelDataUrl"] = upload_model(clients["s3"], settings, manifest)
        container["Image"] = aws_image(settings)
        tag = f"aws-{manifest['model_tar_gz_sha256'][:12]}"
        print(f"deploy: AWS's TensorFlow Serving image {container['Image']}")
    model = resource_name(endpoint, tag)
    sagemaker.create_model(ModelName=model, ExecutionRoleArn=c.role_arn, Tags=settings.tags,
                           PrimaryContainer=container)
    config = model  # one endpoint config per model, named alike
    # An update starts the new fleet at the size autoscaling has reached, not back at instance_count.
    running = existing["ProductionVariants"][0].get("CurrentInstanceCount", 0) if existing else 0
    count = max(int(c.instance_count), running if c.autoscaling.enabled else 0)
    sagemaker.create_endpoint_config(EndpointConfigName=config, Tags=settings.tags, ProductionVariants=[{
        "VariantName": VARIANT, "ModelName": model, "InstanceType": c.instance_type,
        "InitialInstanceCount": count, "InitialVariantWeight": 1.0}])
    alarms = guardrails.ensure_alarms(clients["cloudwatch"], c, VARIANT)
    previous = existing["EndpointConfigName"] if existing else None
    try:
        if existing:
            old_variant = sagemaker.describe_endpoint_config(EndpointConfigName=previous)["ProductionVariants"][0]
            old_type = old_variant["InstanceType"]
            # Application Auto Scaling fails an update that changes a scaled variant's instance type.
            if old_type != c.instance_type and autoscaling.remove(clients["application-autoscaling"], endpoint,
                                                                  VARIANT):
                print(f"deploy: {old_type} -> {c.instance_type}: autoscaling removed for the update, applied again "
                      "after")
            print(f"deploy: updating endpoint {endpoint}: {previous} -> {config}, {guardrails.describe_rollout(c)}")
            switch.update(endpoint, config, guardrails.deployment_config(c, alarms))
        else:
            print(f"deploy: creating endpoint {endpoint} with {config} (alarms {', '.join(alarms)})")
            switch.create(endpoint, config, settings.tags)
        state = switch.wait(endpoint)
    finally:  # whatever the update did, the endpoint keeps scaling as configured
        if c.autoscaling.enabled and describe_endpoint(sagemaker, endpoint) is not None:
            print(autoscaling.apply(clients["application-autoscaling"], c, VARIANT))
    if state["EndpointStatus"] != "InService" or state["EndpointConfigName"] != config:
        reason = state.get("FailureReason") or state["EndpointStatus"]
        if previous is None:
            raise DeployError(f"endpoint {endpoint} did not come up ({reason}); `make undeploy` removes what is left")
        raise DeployError(f"the update to {config} did not complete ({reason}); SageMaker kept or rolled back to "
                          f"the old fleet: endpoint {endpoint} is {state['EndpointStatus']} with "
                          f"{state['EndpointConfigName']}")
    print(f"deploy: endpoint {endpoint} is InService with {config}")
    if not c.autoscaling.enabled and autoscaling.remove(clients["application-autoscaling"], endpoint, VARIANT):
        print("autoscaling: removed (deploy.autoscaling.enabled is false)")
    print(f"invoke: make invoke IMAGE=cat.jpg   (boto3 sagemaker-runtime invoke_endpoint, region {c.region})")
    print(price_line(settings))
    return {"endpoint": endpoint, "config": config, "model": model, "image": container["Image"],
            "previous": previous, "alarms": alarms, "plan": plan}


def ours(sagemaker, arn: str, settings: Settings) -> bool:
    return aws.tagged_with(sagemaker, arn, settings.tags)


def project_resources(sagemaker, settings: Settings) -> dict[str, list[str]]:
    """This project's endpoint configs and models (by tag), newest first."""
    def tagged(operation: str, kind: str) -> list[str]:
        pages = sagemaker.get_paginator(f"list_{operation}").paginate(SortBy="CreationTime", SortOrder="Descending")
        return [item[f"{kind}Name"] for page in pages for item in page[f"{kind}s"]
                if ours(sagemaker, item[f"{kind}Arn"], settings)]

    return {"endpoint_configs": tagged("endpoint_configs", "EndpointConfig"), "models": tagged("models", "Model")}


def status(settings: Settings, clients: dict[str, Any]) -> None:
    sagemaker, c = clients["sagemaker"], settings.cfg
    endpoint = describe_endpoint(sagemaker, c.endpoint_name)
    if endpoint is None:
        print(f"status: no endpoint {c.endpoint_name} in {c.region} (nothing billed for it)")
    else:
        variant = endpoint.get("ProductionVariants", [{}])[0]
        print(f"status: endpoint {endpoint['EndpointName']}: {endpoint['EndpointStatus']}, config "
              f"{endpoint['EndpointConfigName']}, {variant.get('CurrentInstanceCount', '?')} instance(s)"
              + (f", failure: {endpoint['FailureReason']}" if endpoint.get("FailureReason") else ""))
        config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
        model = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
        print(f"status: serving {model['ModelName']} on {model['PrimaryContainer']['Image']}"
              + (f" with {model['PrimaryContainer']['ModelDataUrl']}" if "ModelDataUrl" in model["PrimaryContainer"]
                 else ""))
    alarms = guardrails.ours(clients["cloudwatch"], c)
    print("status: alarms: " + (", ".join(f"{a['AlarmName']} ({a['StateValue']})" for a in alarms) or "none"))
    print("status: " + autoscaling.status_line(autoscaling.describe(clients["application-autoscaling"],
                                                                    c.endpoint_name, VARIANT)))
    resources = project_resources(sagemaker, settings)
    print(f"status: this project's endpoint configs: {', '.join(resources['endpoint_configs']) or 'none'}")
    print(f"status: this project's models: {', '.join(resources['models']) or 'none'}")


def undeploy(settings: Settings, clients: dict[str, Any]) -> None:
    """Delete autoscaling and the endpoint (if this project made it), its alarms, this project's configs and models."""
    sagemaker, name = clients["sagemaker"], settings.cfg.endpoint_name
    endpoint = describe_endpoint(sagemaker, name)
    if endpoint is not None:
        if not ours(sagemaker, endpoint["EndpointArn"], settings):
            raise DeployError(f"endpoint {name} was not created by this project (no project="
                              f"{settings.cfg.project_tag} tag): not touched")
        if autoscaling.remove(clients["application-autoscaling"], name, VARIANT):
            print(f"undeploy: removed the autoscaling of {name}")
        sagemaker.delete_endpoint(EndpointName=name)
        if not aws.wait(sagemaker, "endpoint_deleted", 15, 20, EndpointName=name):
            raise DeployError(f"endpoint {name} is still not deleted after 20 minutes; `make status` shows it")
        print(f"undeploy: deleted endpoint {name}: billing for it stops")
    alarms = guardrails.delete_alarms(clients["cloudwatch"], settings.cfg)
    resources = project_resources(sagemaker, settings)
    for config in resources["endpoint_configs"]:
        sagemaker.delete_endpoint_config(EndpointConfigName=config)
    for model in resources["models"]:
        sagemaker.delete_model(ModelName=model)
    print(f"undeploy: deleted {len(alarms)} alarms, {len(resources['endpoint_configs'])} endpoint configs and "
          f"{len(resources['models'])} models of this project (ECR images and S3 model archives stay: they cost "
          "storage only)")


def local_export(folder: Path) -> Path | None:
    """The endpoint may have been deployed from another machine: without an export here, invoke still
    answers, naming classes by id."""
    if newest_version(folder) is None:
        print(f"invoke: no export in {folder}: classes are shown by id (--export or --label-map names them)",
              file=sys.stderr)
        return None
    return folder


def invoker(runtime, endpoint: str) -> Callable[[str], dict[str, Any]]:
    """``send`` for ``detkit.serve.predict.run_client``: ``invoke_endpoint`` with the body of docs/export.md."""
    from detkit.serve.predict import PredictError, parse_response

    def send(body: str) -> dict[str, Any]:
        try:
            response = runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json", Body=body)
        except aws.call_errors() as exc:
            raise PredictError(f"endpoint {endpoint}: {exc}") from exc
        return parse_response(f"endpoint {endpoint}", 200, response["Body"].read())

    return send


# ---------------------------------------------------------------------------- CLI


SERVICES = ("sagemaker", "ecr", "s3", "cloudwatch", "application-autoscaling", "sagemaker-runtime")


def clients(region: str) -> dict[str, Any]:
    return dict(zip(SERVICES, aws.clients(region, *SERVICES)))


def settings_from(cfg, args) -> Settings:
    return Settings(cfg.deploy, cfg.export.model_name, cfg.model.serving_gib, getattr(args, "context", None),
                    getattr(args, "metrics", None), getattr(args, "archive", None))


def update_wait_minutes(cfg) -> float:
    """An update may take up to the rollout's own limit; deploy waits for whichever is longer."""
    return max(cfg.wait_minutes, cfg.rollout.max_execution_timeout_s / 60)


def command(args) -> int | None:
    """The subcommand ``args`` names, on the config its overrides compose."""
    from detkit.serve.predict import run_client

    cfg = load(args)
    settings = settings_from(cfg, args)
    docker = DockerEngine()
    if args.command == "deploy" and cfg.deploy.image == "custom" and not docker.available():
        raise DeployError("no Docker engine here: deploy.image=custom builds and pushes the serving image with "
                          "docker; run it where `docker info` works, or deploy without Docker: "
                          "make deploy DEPLOY_IMAGE=aws (AWS's TensorFlow Serving image)")
    try:
        made = clients(cfg.deploy.region)
        if args.command == "deploy":
            deploy(settings, made, docker, EndpointSwitch(made["sagemaker"], update_wait_minutes(cfg.deploy)))
        elif args.command == "status":
            status(settings, made)
        elif args.command == "invoke":
            if args.export is None and args.label_map is None:
                args.export = local_export(export_folder(cfg))
            return run_client(args, invoker(made["sagemaker-runtime"], cfg.deploy.endpoint_name))
        else:
            undeploy(settings, made)
    except aws.call_errors() as exc:
        raise DeployError(f"AWS ({cfg.deploy.region}): {exc}") from None
    return None


def main(argv: list[str] | None = None) -> int:
    from detkit.serve.predict import client_arguments

    parser = command_parser("detkit.cloud.deploy", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    deploying = commands.add_parser("deploy", help="gate, image, create or update the endpoint, wait for InService")
    deploying.add_argument("--context", type=Path, required=True, help="the package stage's docker build context")
    deploying.add_argument("--archive", type=Path, required=True, help="the package stage's model.tar.gz")
    deploying.add_argument("--metrics", type=Path, required=True, help="the eval stage's eval.json")
    commands.add_parser("status", help="the endpoint, its alarms and autoscaling, this project's models and configs")
    client_arguments(commands.add_parser("invoke", help="send an image with invoke_endpoint"))
    commands.add_parser("undeploy", help="delete the autoscaling, endpoint, alarms, configs and models of this project")
    return run_command(parser, argv, command, errors=(DeployError,))


if __name__ == "__main__":
    sys.exit(main())
