"""Compose and validate the experiment config: ``params.yaml`` plus the ``conf/`` groups.

``params.yaml`` is what users edit and what DVC tracks. A key that names a config group
(``dataset: sample``) is replaced by the body of ``conf/<group>/<name>.yaml``. Hydra's
compose API does the composition, with ``params.yaml`` as the primary config and its group
keys as the defaults list, so overrides in Hydra's grammar work the same on every stage's
command line (``python -m stages.train train.steps=10 model=retinanet_tiny``). The result is
checked once, before any work, against the dataclass schema below: unknown keys fail with
the closest valid key, missing ``???`` values fail by name, and types are coerced or
refused by OmegaConf.

DVC's own Hydra mode stays off on purpose (it rewrites ``params.yaml`` on ``dvc exp
run``, losing hand edits), and ``@hydra.main`` is not used (it owns the working directory
and logging): the stages call ``compose`` themselves.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("dataset", "model", "compute", "deploy")
PRIMARY = "detkit_params"  # params.yaml's name in Hydra's config store


class ConfigError(ValueError):
    """A config problem, phrased for the user: which file, which key, what to do."""


@dataclass
class Archive:
    name: str = MISSING
    urls: list[str] = MISSING
    size: int | None = None
    sha256: str = MISSING


@dataclass
class Dataset:
    name: str = MISSING
    layout: str = "pets"
    archives: list[Archive] = field(default_factory=list)
    local_dir: str | None = None
    label_map: str | None = None


@dataclass
class Split:
    train_fraction: float = 0.7
    seed: int = 42


@dataclass
class TFRecord:
    train_shards: int = 4
    val_shards: int = 2


# ---- model group (conf/model/<name>.yaml); defaults are KerasHub RetinaNet's (ResNet-50 FPN, COCO)


@dataclass
class ResNet:
    input_conv_filters: list[int] = field(default_factory=lambda: [64])
    input_conv_kernel_sizes: list[int] = field(default_factory=lambda: [7])
    stackwise_num_filters: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    stackwise_num_blocks: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    stackwise_num_strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    block_type: str = "bottleneck_block"
    use_pre_activation: bool = False


@dataclass
class Anchors:
    num_scales: int = 3
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    anchor_size: float = 4.0


@dataclass
class Head:
    num_conv_layers: int = 4
    use_group_norm: bool = False
    prior_probability: float = 0.01


@dataclass
class Matching:
    positive_threshold: float = 0.5
    negative_threshold: float = 0.4
    force_match: bool = False


@dataclass
class Detection:
    max_detections: int = 100
    max_detections_per_class: int = 100
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    pre_nms_top_k: int = 1000


@dataclass
class ServingMemory:
    base: float = MISSING
    per_image: float = MISSING


@dataclass
class Model:
    name: str = MISSING
    builder: str = "retinanet"
    pretrained: str = "none"
    pretrained_sha256: str | None = None
    image_size: int = 512
    scale: list[float] = field(default_factory=lambda: [1.0 / 255.0])
    offset: list[float] = field(default_factory=lambda: [0.0])
    backbone: ResNet = field(default_factory=ResNet)
    min_level: int = 3
    max_level: int = 7
    use_p5: bool = False
    use_fpn_batch_norm: bool = False
    freeze_batch_norm: bool = False
    anchors: Anchors = field(default_factory=Anchors)
    head: Head = field(default_factory=Head)
    matching: Matching = field(default_factory=Matching)
    detection: Detection = field(default_factory=Detection)
    serving_gib: ServingMemory = field(default_factory=ServingMemory)


# ---- train section of params.yaml


@dataclass
class Augment:
    hflip: bool = True
    crop_min_scale: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0


@dataclass
class Train:
    steps: int = 20000
    batch_size: int = 8
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 500
    min_lr_fraction: float = 0.0
    clipnorm: float | None = 10.0
    class_loss_weight: float = 1.0
    max_boxes: int = 16
    shuffle_buffer: int = 1024
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 42
    deterministic: bool = True
    log_every: int = 10
    eval_every: int = 0
    keep: str = "last"
    mixed_precision: str = "auto"
    distribute: str = "auto"
    jit_compile: str = "auto"
    augment: Augment = field(default_factory=Augment)


@dataclass
class Eval:
    batch_size: int = 16
    coco_backend: str = "faster_coco_eval"
    num_samples: int = 8
    sample_min_score: float = 0.3


@dataclass
class Export:
    model_name: str = "pet_object_detection"
    version: int | None = None
    max_detections: int = 100
    extra_signatures: list[str] = field(default_factory=list)
    check_images: int = 16
    check_tolerance: float = 1e-3
    max_image_pixels: int = 25_000_000


@dataclass
class AwsImage:
    repository: str = "tensorflow-inference"
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Serving:
    max_batch_size: int | None = None
    memory_fraction: float = 0.8


@dataclass
class Rollout:
    traffic: str = "canary"
    step_percent: int = 50
    wait_interval_s: int = 300
    termination_wait_s: int = 120
    max_execution_timeout_s: int = 3600


@dataclass
class Alarms:
    period_s: int = 60
    evaluation_periods: int = 2
    max_5xx_errors: float = 1.0
    max_model_latency_ms: float = 5000.0


@dataclass
class Autoscaling:
    enabled: bool = True
    min_instances: int = 1
    max_instances: int = 2
    target_invocations_per_instance: float = 60.0
    scale_in_cooldown_s: int = 300
    scale_out_cooldown_s: int = 60


@dataclass
class Transform:
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    content_type: str = "application/x-image"
    split_type: str = "None"
    max_payload_mb: int = 6
    max_concurrent_transforms: int | None = None
    wait_minutes: int = 120


@dataclass
class Instance:
    vcpus: int = MISSING
    memory_gib: float = MISSING
    hourly_usd: float = MISSING


@dataclass
class Deploy:
    name: str = MISSING
    region: str = "us-east-1"
    role_arn: str | None = None
    image: str = "custom"
    aws_image: AwsImage = field(default_factory=AwsImage)
    bucket: str | None = None
    prefix: str = "pet-object-detection"
    ecr_repository: str = "pet-object-detection"
    image_tag: str | None = None
    endpoint_name: str = "pet-object-detection"
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    min_ap50: float = 0.5
    wait_minutes: int = 30
    project_tag: str = "pet-object-detection"
    serving: Serving = field(default_factory=Serving)
    rollout: Rollout = field(default_factory=Rollout)
    alarms: Alarms = field(default_factory=Alarms)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    transform: Transform = field(default_factory=Transform)
    instances: dict[str, Instance] = field(default_factory=dict)


@dataclass
class Compute:
    """Where the train stage runs (conf/compute/<name>.yaml); the keys below are the sagemaker group's."""

    name: str = MISSING
    region: str = "us-east-1"
    role_arn: str | None = None
    bucket: str | None = None
    prefix: str = "pet-object-detection"
    image: str | None = None
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    volume_size_gb: int = 50
    max_run_minutes: int = 720
    spot: bool = True
    max_wait_minutes: int = 1440
    base_job_name: str = "pet-object-detection-train"
    project_tag: str = "pet-object-detection"
    poll_seconds: int = 30
    hourly_usd: dict[str, float] = field(default_factory=dict)


@dataclass
class Config:
    dataset: Dataset = field(default_factory=Dataset)
    split: Split = field(default_factory=Split)
    tfrecord: TFRecord = field(default_factory=TFRecord)
    model: Model = field(default_factory=Model)
    compute: Compute = field(default_factory=Compute)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)
    export: Export = field(default_factory=Export)
    deploy: Deploy = field(default_factory=Deploy)


LAYOUTS = ("pets", "voc")
COCO_BACKENDS = ("faster_coco_eval", "pycocotools")  # detkit.coco.BACKENDS, without importing numpy here
BUILDERS = ("retinanet", "preset")
BLOCK_TYPES = ("basic_block", "bottleneck_block", "basic_block_vd", "bottleneck_block_vd")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
KEEP = ("last", "best")
AUTO_SWITCH = ("auto", "true", "false")
DISTRIBUTE = ("auto", "none", "mirrored", "multi_worker")
COMPUTE = ("local", "sagemaker")
EXTRA_SIGNATURES = ("image_tensor", "tf_example")
DEPLOY_IMAGES = ("custom", "aws")
TRAFFIC = ("all_at_once", "canary", "linear")
SPLIT_TYPES = ("None", "Line", "RecordIO", "TFRecord")


def repo_root() -> Path:
    """The user's repository, where shared state lives (the MLflow store): DVC exports DVC_ROOT to
    stage commands, and for queued and --temp experiments points it at this repository, not at the
    executor's copy the stage runs in; otherwise the cwd."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def workspace_root() -> Path:
    """The tree a stage reads params.yaml and conf/ from and writes its outputs in. DVC starts each
    stage command (DVC_STAGE set) in dvc.yaml's folder: the workspace, or a queued or --temp
    experiment's copy under .dvc/tmp/exps; outside DVC, ``repo_root()``."""
    return Path.cwd().resolve() if "DVC_STAGE" in os.environ else repo_root()


def closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_keys(node: Any, schema: Any, where: str, prefix: str) -> None:
    """Refuse keys the schema does not know, naming the closest one that it does."""
    if isinstance(node, DictConfig) and isinstance(schema, DictConfig):
        if OmegaConf.get_type(schema) is dict:  # a free mapping (e.g. deploy.instances): any keys
            return
        known = [str(k) for k in schema.keys()]
        for key in node.keys():
            full = f"{prefix}{key}"
            if str(key) not in known:
                raise ConfigError(f"{where}: unknown key '{full}'{closest(str(key), known)}")
            _check_keys(node._get_node(key), schema._get_node(key), where, f"{full}.")
    elif isinstance(node, ListConfig) and isinstance(schema, ListConfig):
        element = schema._metadata.element_type
        if element is not Any and hasattr(element, "__dataclass_fields__"):
            element_schema = OmegaConf.structured(element)
            for i, item in enumerate(node):
                _check_keys(item, element_schema, where, f"{prefix[:-1]}[{i}].")


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and friends: name the file either way
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def load_config(
    params: str | Path = "params.yaml",
    conf_dir: str | Path = "conf",
    overrides: list[str] | None = None,
) -> DictConfig:
    """Compose params.yaml with its config groups, apply Hydra overrides, validate.

    ``overrides`` use Hydra's grammar: ``group=name`` switches a group file
    (``model=retinanet_tiny``), ``a.b=c`` sets a key (``train.steps=10``,
    ``model.image_size=256``), ``+a.b=c`` adds one. Relative paths are taken from the
    repository root, so stages work from any cwd.
    """
    root = workspace_root()
    params_path = root / params
    conf_path = root / conf_dir
    if not params_path.is_file():
        raise ConfigError(f"{params_path}: params file not found")
    user = _load_yaml(params_path)
    _check_keys(user, OmegaConf.structured(Config), str(params_path), "")
    composed = _compose(user, params_path, conf_path, list(overrides or []))
    choices = composed.hydra.runtime.choices
    OmegaConf.set_struct(composed, False)
    del composed["hydra"]
    schema = OmegaConf.structured(Config)
    for group in GROUPS:
        if group in composed:
            path = conf_path / group / f"{choices[group]}.yaml"
            _check_keys(_load_yaml(path), schema[group], str(path), "")
            composed[group].name = choices[group]
    # Keys added with + by an override, which no file holds.
    _check_keys(composed, schema, "override", "")
    try:
        cfg = OmegaConf.merge(schema, composed)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{params_path}: {exc}") from exc
    # A ??? in the user's files does not override a schema default when merged: check both.
    missing = sorted(OmegaConf.missing_keys(composed) | OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"required config values are not set (marked ???): {', '.join(missing)}; "
            "set them in params.yaml or the group file"
        )
    _validate_values(cfg)
    return cfg


def _compose(user: DictConfig, params_path: Path, conf_path: Path, overrides: list[str]) -> DictConfig:
    """Hydra's compose API over params.yaml as the primary config, its group keys as the defaults list."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigKeyError

    defaults = []
    for group in GROUPS:
        if group in user:
            name = user.pop(group)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{params_path}: '{group}' must name a file in {conf_path / group}/")
            defaults.append({group: name})
    primary = OmegaConf.merge({"defaults": [*defaults, "_self_"]}, user)
    ConfigStore.instance().store(name=PRIMARY, node=primary)
    with initialize_config_dir(config_dir=str(conf_path), version_base=None):
        try:
            return compose(config_name=PRIMARY, overrides=overrides, return_hydra_config=True)
        except (HydraException, ConfigKeyError) as exc:
            raise ConfigError(_explain(exc, primary, conf_path, overrides)) from None


def _explain(exc: Exception, primary: DictConfig, conf_path: Path, overrides: list[str]) -> str:
    """Hydra's complaint, phrased with the file or key at fault and the closest valid choice."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as parse_error:
        return f"override: {parse_error}"
    picks = {g: next(iter(d.values())) for d in primary.defaults if isinstance(d, DictConfig) for g in d}
    for override in parsed:
        if override.key_or_group in GROUPS:
            picks[override.key_or_group] = override.value()
    for group, name in picks.items():
        options = sorted(p.stem for p in (conf_path / group).glob("*.yaml"))
        if name not in options:
            return (f"{group}={name}: no such config file {conf_path / group / f'{name}.yaml'}"
                    f"{closest(str(name), options)}; choose one of: {', '.join(options)}")
    # Otherwise a key that exists nowhere: name the first missing part and its closest sibling.
    known = OmegaConf.structured(Config)
    for override in parsed:
        if override.key_or_group in GROUPS or override.is_add():
            continue
        node, done = known, []
        for part in override.key_or_group.split("."):
            if not isinstance(node, DictConfig) or OmegaConf.get_type(node) is dict:
                break
            if part not in node:
                choices = [str(k) for k in node.keys()]
                return (f"override '{override.input_line}': unknown key '{'.'.join([*done, part])}'"
                        f"{closest(part, choices)}")
            node, done = node._get_node(part), [*done, part]
    return f"{exc}"


def _validate_values(cfg: DictConfig) -> None:
    if cfg.dataset.layout not in LAYOUTS:
        raise ConfigError(
            f"dataset.layout: '{cfg.dataset.layout}' is not one of {', '.join(LAYOUTS)}"
            f"{closest(cfg.dataset.layout, list(LAYOUTS))}"
        )
    if not 0.0 < cfg.split.train_fraction < 1.0:
        raise ConfigError(f"split.train_fraction: {cfg.split.train_fraction} must be in (0, 1)")
    for key in ("train_shards", "val_shards"):
        if cfg.tfrecord[key] < 1:
            raise ConfigError(f"tfrecord.{key}: {cfg.tfrecord[key]} must be at least 1")
    _validate_model(cfg.model)
    _validate_train(cfg.train)
    _one_of("eval.coco_backend", cfg.eval.coco_backend, COCO_BACKENDS)
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size: {cfg.eval.batch_size} must be at least 1")
    _validate_export(cfg.export)
    if cfg.compute.name == "sagemaker":
        _validate_compute(cfg.compute)
    _validate_deploy(cfg.deploy)


def _validate_deploy(d: DictConfig) -> None:
    """Values SageMaker, CloudWatch or Application Auto Scaling would refuse, caught before any call."""
    where = f"conf/deploy/{d.name}.yaml"
    _one_of("deploy.image", d.image, DEPLOY_IMAGES)
    _one_of("deploy.rollout.traffic", d.rollout.traffic, TRAFFIC)
    _one_of("deploy.transform.split_type", d.transform.split_type, SPLIT_TYPES)
    for key in ("instance_type", "transform.instance_type"):
        kind = OmegaConf.select(d, key)
        if kind not in d.instances:
            raise ConfigError(f"{where}: {key} {kind} is not in deploy.instances (known: "
                              f"{', '.join(d.instances)}); add its vcpus, memory_gib and hourly_usd")
    a, u = d.autoscaling, d.rollout
    checks = [
        (d.instance_count >= 1 and 0.0 <= d.min_ap50 <= 1.0, "instance_count must be >= 1, min_ap50 in [0, 1]"),
        (d.serving.max_batch_size is None or d.serving.max_batch_size >= 1, "serving.max_batch_size must be >= 1"),
        (0.0 < d.serving.memory_fraction <= 1.0, "serving.memory_fraction must be in (0, 1]"),
        # SageMaker's bounds: a canary of at most half the fleet, linear steps of 10-50%.
        (u.traffic == "all_at_once" or (1 if u.traffic == "canary" else 10) <= u.step_percent <= 50,
         f"rollout.step_percent {u.step_percent} must be in [1, 50] for canary, [10, 50] for linear"),
        (0 <= u.wait_interval_s <= 3600 and 0 <= u.termination_wait_s <= 3600,
         "rollout.wait_interval_s and rollout.termination_wait_s must be in [0, 3600]"),
        (600 <= u.max_execution_timeout_s <= 14400, "rollout.max_execution_timeout_s must be in [600, 14400]"),
        (d.alarms.period_s >= 60 and d.alarms.period_s % 60 == 0, "alarms.period_s must be a multiple of 60"),
        (d.alarms.evaluation_periods >= 1, "alarms.evaluation_periods must be >= 1"),
        (1 <= a.min_instances <= a.max_instances, "autoscaling needs 1 <= min_instances <= max_instances"),
        (a.target_invocations_per_instance > 0, "autoscaling.target_invocations_per_instance must be > 0"),
        (a.scale_in_cooldown_s >= 0 and a.scale_out_cooldown_s >= 0, "autoscaling cool-downs must be >= 0"),
        (d.transform.instance_count >= 1 and 1 <= d.transform.max_payload_mb <= 100,
         "transform.instance_count must be >= 1, transform.max_payload_mb in [1, 100]"),
        (d.transform.max_concurrent_transforms is None
         or 1 <= d.transform.max_concurrent_transforms * d.transform.max_payload_mb <= 100,
         "transform.max_concurrent_transforms x transform.max_payload_mb must be in [1, 100] (SageMaker's limit)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")


def _validate_export(e: DictConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", e.model_name):
        raise ConfigError(f"export.model_name: '{e.model_name}' must be letters, digits, '_', '.', '-' "
                          "(it is a folder name and part of the serving URL)")
    if e.version is not None and e.version < 1:
        raise ConfigError(f"export.version: {e.version} must be at least 1, or null for the next free one")
    for name in e.extra_signatures:
        _one_of("export.extra_signatures", name, EXTRA_SIGNATURES)
    if e.max_detections < 1 or e.check_images < 1:
        raise ConfigError("export.max_detections and export.check_images must be at least 1")
    if e.check_tolerance <= 0:
        raise ConfigError(f"export.check_tolerance: {e.check_tolerance} must be positive")
    if e.max_image_pixels < 1:
        raise ConfigError(f"export.max_image_pixels: {e.max_image_pixels} must be at least 1 (width x height of "
                          "the largest image the served model decodes)")


def _validate_compute(c: DictConfig) -> None:
    """Values SageMaker would refuse, caught before anything is uploaded. role_arn and bucket come
    from the environment and are checked when a job is about to start (other stages never need them)."""
    where = f"conf/compute/{c.name}.yaml"
    if not re.fullmatch(r"ml\.[a-z0-9-]+\.[a-z0-9]+", c.instance_type):
        raise ConfigError(f"{where}: instance_type '{c.instance_type}' is not a SageMaker instance type "
                          "(ml.<family>.<size>, e.g. ml.g5.xlarge)")
    for key in ("instance_count", "volume_size_gb", "max_run_minutes", "max_wait_minutes", "poll_seconds"):
        if c[key] < 1:
            raise ConfigError(f"{where}: {key}: {c[key]} must be at least 1")
    if c.spot and c.max_wait_minutes < c.max_run_minutes:
        raise ConfigError(f"{where}: max_wait_minutes ({c.max_wait_minutes}) must be at least max_run_minutes "
                          f"({c.max_run_minutes}) with spot: SageMaker counts the run within the wait")
    # Job names are <base_job_name>-<12 hex>-<attempt>, and SageMaker allows 63 characters.
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", c.base_job_name) or len(c.base_job_name) > 44:
        raise ConfigError(f"{where}: base_job_name '{c.base_job_name}' must be at most 44 letters, digits and "
                          "inner hyphens")
    if not re.fullmatch(r"[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*", c.prefix):
        raise ConfigError(f"{where}: prefix '{c.prefix}' must be an S3 key prefix without leading or trailing '/'")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}{closest(value, list(choices))}")


def _validate_model(m: DictConfig) -> None:
    where = f"conf/model/{m.name}.yaml"
    _one_of(f"{where}: builder", m.builder, BUILDERS)
    if m.serving_gib.base <= 0 or m.serving_gib.per_image <= 0:
        raise ConfigError(f"{where}: serving_gib.base and serving_gib.per_image must be positive (GiB)")
    if m.builder == "preset" and m.pretrained == "none":
        raise ConfigError(f"{where}: builder 'preset' loads the weights named by 'pretrained', which is 'none'")
    if m.builder == "retinanet" and m.pretrained != "none":
        raise ConfigError(f"{where}: builder 'retinanet' trains from scratch, so 'pretrained' must be 'none' "
                          f"(got '{m.pretrained}'); use builder 'preset' to start from a KerasHub preset")
    if m.image_size < 32:
        raise ConfigError(f"{where}: image_size: {m.image_size} must be at least 32")
    stride = 2 ** min(m.max_level, 5)  # the FPN's top-down path needs exact halving down to P5
    if m.image_size % stride:
        raise ConfigError(f"{where}: image_size: {m.image_size} must be a multiple of {stride} (2**min(max_level, 5))")
    for key in ("scale", "offset"):
        if len(m[key]) not in (1, 3):
            raise ConfigError(f"{where}: {key}: needs 1 or 3 values (per RGB channel), got {len(m[key])}")
    if not 2 <= m.min_level <= m.max_level:
        raise ConfigError(f"{where}: min_level {m.min_level}, max_level {m.max_level}: need 2 <= min <= max")
    b = m.backbone
    _one_of(f"{where}: backbone.block_type", b.block_type, BLOCK_TYPES)
    lengths = {len(b.stackwise_num_filters), len(b.stackwise_num_blocks), len(b.stackwise_num_strides)}
    if len(lengths) != 1:
        raise ConfigError(f"{where}: backbone.stackwise_num_filters/_blocks/_strides must have the same length")
    if b.stackwise_num_filters[0] != 64:
        raise ConfigError(f"{where}: backbone.stackwise_num_filters[0]: KerasHub's ResNet needs 64, got "
                          f"{b.stackwise_num_filters[0]}")
    if m.builder == "retinanet" and m.min_level > len(b.stackwise_num_filters) + 1:
        raise ConfigError(f"{where}: min_level {m.min_level}: the backbone's {len(b.stackwise_num_filters)} stacks "
                          f"only reach P{len(b.stackwise_num_filters) + 1}")
    if m.anchors.num_scales < 1 or not m.anchors.aspect_ratios or min(m.anchors.aspect_ratios) <= 0:
        raise ConfigError(f"{where}: anchors: need num_scales >= 1 and positive aspect_ratios")
    if not 0.0 < m.head.prior_probability < 1.0:
        raise ConfigError(f"{where}: head.prior_probability: {m.head.prior_probability} must be in (0, 1)")
    if not 0.0 < m.matching.negative_threshold <= m.matching.positive_threshold <= 1.0:
        raise ConfigError(f"{where}: matching: need 0 < negative_threshold <= positive_threshold <= 1")
    d = m.detection
    if not 0.0 < d.iou_threshold <= 1.0 or not 0.0 <= d.score_threshold < 1.0:
        raise ConfigError(f"{where}: detection: iou_threshold must be in (0, 1], score_threshold in [0, 1)")
    if min(d.max_detections, d.max_detections_per_class, d.pre_nms_top_k) < 1:
        raise ConfigError(f"{where}: detection: max_detections, max_detections_per_class, pre_nms_top_k must be >= 1")


def _validate_train(t: DictConfig) -> None:
    for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "max_boxes", "shuffle_buffer"):
        if t[key] < 1:
            raise ConfigError(f"train.{key}: {t[key]} must be at least 1")
    _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("train.schedule", t.schedule, SCHEDULES)
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate: {t.learning_rate} must be positive")
    if not 0 <= t.warmup_steps < t.steps:
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} must be in [0, train.steps={t.steps})")
    if not 0.0 <= t.min_lr_fraction <= 1.0:
        raise ConfigError(f"train.min_lr_fraction: {t.min_lr_fraction} must be in [0, 1]")
    if t.clipnorm is not None and t.clipnorm <= 0:
        raise ConfigError(f"train.clipnorm: {t.clipnorm} must be positive, or null for no clipping")
    if t.class_loss_weight <= 0:
        raise ConfigError(f"train.class_loss_weight: {t.class_loss_weight} must be positive")
    if t.weight_decay < 0 or not 0 <= t.momentum < 1:
        raise ConfigError("train.weight_decay must be >= 0 and train.momentum in [0, 1)")
    if t.log_every < 1 or t.eval_every < 0:
        raise ConfigError("train.log_every must be at least 1 and train.eval_every at least 0 (0 = off)")
    _one_of("train.keep", t.keep, KEEP)
    if t.keep == "best" and not t.eval_every:
        raise ConfigError("train.keep: 'best' needs validation during training: set train.eval_every > 0")
    for key in ("mixed_precision", "jit_compile"):
        _one_of(f"train.{key}", str(t[key]).lower(), AUTO_SWITCH)
    _one_of("train.distribute", t.distribute, DISTRIBUTE)
    a = t.augment
    if not 0.1 <= a.crop_min_scale <= 1.0:
        raise ConfigError(f"train.augment.crop_min_scale: {a.crop_min_scale} must be in [0.1, 1] (1 = no crop)")
    if not 0.0 <= a.brightness < 1.0 or not 0.0 <= a.contrast < 1.0:
        raise ConfigError("train.augment.brightness and .contrast must be in [0, 1)")


def main(argv: list[str] | None = None) -> int:
    """``python -m detkit.config KEY``: print one composed, validated value (for the Makefile)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m detkit.config", description=main.__doc__)
    parser.add_argument("key", help="dotted key, e.g. export.model_name")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params)
        absent = object()
        value = OmegaConf.select(cfg, args.key, default=absent, throw_on_missing=True)
    except (ConfigError, OmegaConfBaseException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if value is absent:
        parent, _, leaf = args.key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        hint = closest(leaf, [str(k) for k in node.keys()]) if isinstance(node, DictConfig) else ""
        print(f"error: no config key '{args.key}'{hint}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(value).strip() if isinstance(value, (DictConfig, ListConfig))
          else "null" if value is None else value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
