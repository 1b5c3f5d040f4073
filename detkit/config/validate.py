"""Value checks that types alone cannot express, run once after composition (``load_config``)."""

from __future__ import annotations

import math
import re

from omegaconf import DictConfig, OmegaConf

from detkit.config.errors import ConfigError, closest
from detkit.config.schema import (
    AUTO_SWITCH,
    BLOCK_TYPES,
    COCO_BACKENDS,
    DEPLOY_IMAGES,
    DISTRIBUTE,
    EXTRA_SIGNATURES,
    KEEP,
    LAYOUTS,
    OPTIMIZERS,
    SCHEDULES,
    SPLIT_TYPES,
    TRAFFIC,
)


def validate_values(cfg: DictConfig) -> None:
    if cfg.dataset.layout not in LAYOUTS:
        raise ConfigError(
            f"dataset.layout: '{cfg.dataset.layout}' is not one of {', '.join(LAYOUTS)}"
            f"{closest(cfg.dataset.layout, list(LAYOUTS))}"
        )
    if cfg.dataset.max_extracted_bytes < 1:
        raise ConfigError(f"dataset.max_extracted_bytes: {cfg.dataset.max_extracted_bytes} must be at least 1")
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
    if e.max_jpeg_scans < 1:
        raise ConfigError(f"export.max_jpeg_scans: {e.max_jpeg_scans} must be at least 1 (every JPEG has a scan)")


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
    if m.serving_gib.base <= 0 or m.serving_gib.per_image <= 0:
        raise ConfigError(f"{where}: serving_gib.base and serving_gib.per_image must be positive (GiB)")
    if m.image_size < 32:
        raise ConfigError(f"{where}: image_size: {m.image_size} must be at least 32")
    d = m.detection
    if not 0.0 <= d.score_threshold < 1.0 or d.max_detections < 1:
        raise ConfigError(f"{where}: detection: score_threshold must be in [0, 1), max_detections >= 1")
    FAMILY_CHECKS[m.family](m, where)


def _validate_retinanet(m: DictConfig, where: str) -> None:
    a = m.architecture
    _validate_start(m, where)
    stride = 2 ** min(a.max_level if a is not None else 5, 5)  # the FPN's top-down path halves exactly down to P5
    if m.image_size % stride:
        raise ConfigError(f"{where}: image_size: {m.image_size} must be a multiple of {stride}")
    if not 0.0 < m.prior_probability < 1.0:
        raise ConfigError(f"{where}: prior_probability: {m.prior_probability} must be in (0, 1)")
    if not 0.0 < m.matching.negative_threshold <= m.matching.positive_threshold <= 1.0:
        raise ConfigError(f"{where}: matching: need 0 < negative_threshold <= positive_threshold <= 1")
    d = m.detection
    if not 0.0 < d.iou_threshold <= 1.0 or min(d.max_detections_per_class, d.pre_nms_top_k) < 1:
        raise ConfigError(f"{where}: detection: iou_threshold must be in (0, 1], max_detections_per_class and "
                          "pre_nms_top_k >= 1")
    if a is None:
        return
    _validate_resnet(a, where)
    if not 2 <= a.min_level <= a.max_level:
        raise ConfigError(f"{where}: architecture: min_level {a.min_level}, max_level {a.max_level}: "
                          "need 2 <= min <= max")
    b = a.backbone
    if a.min_level > len(b.stackwise_num_filters) + 1:
        raise ConfigError(f"{where}: architecture.min_level {a.min_level}: the backbone's "
                          f"{len(b.stackwise_num_filters)} stacks only reach P{len(b.stackwise_num_filters) + 1}")
    if a.anchors.num_scales < 1 or not a.anchors.aspect_ratios or min(a.anchors.aspect_ratios) <= 0:
        raise ConfigError(f"{where}: architecture.anchors: need num_scales >= 1 and positive aspect_ratios")


def _validate_start(m: DictConfig, where: str) -> None:
    """A model file builds either from its ``architecture`` (``pretrained: none``) or from a preset's."""
    if m.architecture is None and m.pretrained == "none":
        raise ConfigError(f"{where}: 'architecture: null' takes the architecture from the preset in 'pretrained', "
                          "which is 'none'")
    if m.architecture is not None and m.pretrained != "none":
        raise ConfigError(f"{where}: 'architecture' builds a model from scratch, so 'pretrained' must be 'none' "
                          f"(got '{m.pretrained}'); set 'architecture: null' to fine-tune the preset's")


def _validate_scaling(a: DictConfig, where: str) -> None:
    for key in ("scale", "offset"):
        if len(a[key]) not in (1, 3):
            raise ConfigError(f"{where}: architecture.{key}: needs 1 or 3 values (per RGB channel), got {len(a[key])}")


def _validate_resnet(a: DictConfig, where: str) -> None:
    """``architecture.scale``/``offset`` and ``architecture.backbone`` (KerasHub ResNetBackbone keys)."""
    _validate_scaling(a, where)
    b = a.backbone
    _one_of(f"{where}: architecture.backbone.block_type", b.block_type, BLOCK_TYPES)
    lengths = {len(b.stackwise_num_filters), len(b.stackwise_num_blocks), len(b.stackwise_num_strides)}
    if len(lengths) != 1:
        raise ConfigError(f"{where}: architecture.backbone.stackwise_num_filters/_blocks/_strides must have the "
                          "same length")
    if b.stackwise_num_filters[0] != 64:
        raise ConfigError(f"{where}: architecture.backbone.stackwise_num_filters[0]: KerasHub's ResNet needs 64, "
                          f"got {b.stackwise_num_filters[0]}")


def _validate_faster_rcnn(m: DictConfig, where: str) -> None:
    _validate_start(m, where)
    an, f, s, d = m.anchors, m.first_stage, m.second_stage, m.detection
    if an.stride < 1 or m.image_size % an.stride:
        raise ConfigError(f"{where}: image_size: {m.image_size} must be a multiple of anchors.stride ({an.stride})")
    if an.base_size <= 0 or not an.scales or not an.aspect_ratios or min(*an.scales, *an.aspect_ratios) <= 0:
        raise ConfigError(f"{where}: anchors: base_size, scales and aspect_ratios must be positive (and not empty)")
    if len(m.box_coder_scales) != 4 or min(m.box_coder_scales) <= 0:
        raise ConfigError(f"{where}: box_coder_scales: needs 4 positive values (y, x, height, width)")
    if not 0.0 <= f.negative_threshold <= f.positive_threshold <= 1.0:
        raise ConfigError(f"{where}: first_stage: need 0 <= negative_threshold <= positive_threshold <= 1")
    for section, key in (("first_stage", "conv_depth"), ("first_stage", "batch_size"), ("first_stage", "pre_nms_top_k"),
                         ("first_stage", "proposals_infer"), ("second_stage", "pooled_size"),
                         ("detection", "max_detections_per_class")):
        if m[section][key] < 1:
            raise ConfigError(f"{where}: {section}.{key}: {m[section][key]} must be at least 1")
    if not 1 <= s.batch_size <= f.proposals_train:
        raise ConfigError(f"{where}: second_stage.batch_size: {s.batch_size} must be in [1, first_stage."
                          f"proposals_train={f.proposals_train}] (it samples from the proposals)")
    if s.crop_size % s.pooled_size:
        raise ConfigError(f"{where}: second_stage.crop_size: {s.crop_size} must be a multiple of pooled_size "
                          f"({s.pooled_size})")
    for section in ("first_stage", "second_stage"):
        weights = [v for k, v in m[section].items() if k.endswith("_weight")]
        if not 0.0 < m[section].positive_fraction <= 1.0 or min(weights) <= 0:
            raise ConfigError(f"{where}: {section}: positive_fraction must be in (0, 1] and the loss weights "
                              "positive")
    if not 0.0 < f.nms_iou_threshold <= 1.0 or not 0.0 < d.iou_threshold <= 1.0 or not 0 < s.positive_threshold <= 1:
        raise ConfigError(f"{where}: first_stage.nms_iou_threshold, second_stage.positive_threshold and "
                          "detection.iou_threshold must be in (0, 1]")
    a = m.architecture
    if a is None:
        return
    _validate_resnet(a, where)
    b = a.backbone
    if len(b.stackwise_num_filters) != 4:
        raise ConfigError(f"{where}: architecture.backbone: needs 4 stacks (3 for the features, the fourth as the "
                          f"box head), got {len(b.stackwise_num_filters)}")
    stride = 4 * math.prod(b.stackwise_num_strides[:3])
    if stride != an.stride:
        raise ConfigError(f"{where}: anchors.stride: {an.stride}, but the backbone's first three stacks give "
                          f"features at stride {stride} (4 x the product of their strides)")


def _validate_dfine(m: DictConfig, where: str) -> None:
    _validate_start(m, where)
    if min(m.matcher.values()) < 0 or min(m.loss_weights.values()) < 0 or m.ddf_temperature <= 0:
        raise ConfigError(f"{where}: matcher costs and loss_weights must be >= 0, ddf_temperature > 0")
    if m.image_size % 32:  # HGNetV2's last stage is at stride 32
        raise ConfigError(f"{where}: image_size: {m.image_size} must be a multiple of 32")
    a = m.architecture
    if a is None:
        return
    _validate_scaling(a, where)
    b, d = a.backbone, a.decoder
    stages = len(b.stackwise_stage_filters)
    if not stages or {len(b.apply_downsample), len(b.use_lightweight_conv_block), len(b.depths),
                      len(b.hidden_sizes)} != {stages}:
        raise ConfigError(f"{where}: architecture.backbone: stackwise_stage_filters, apply_downsample, "
                          "use_lightweight_conv_block, depths and hidden_sizes need one entry per stage")
    known = [f"stage{i + 1}" for i in range(stages)]
    for key, features in (("backbone.out_features", b.out_features), ("decoder.out_features", d.out_features)):
        for feature in features:
            _one_of(f"{where}: architecture.{key}", feature, tuple(known))
    levels = len(d.out_features)
    if {len(d.encoder_in_channels), len(d.decoder_in_channels), len(d.feat_strides)} != {levels} or \
            d.num_feature_levels != levels:
        raise ConfigError(f"{where}: architecture.decoder: encoder_in_channels, decoder_in_channels, feat_strides "
                          f"and num_feature_levels need one entry per out_feature ({levels})")
    for key in ("num_queries", "num_decoder_layers", "hidden_dim", "decoder_attention_heads", "num_attention_heads"):
        if d[key] < 1:
            raise ConfigError(f"{where}: architecture.decoder.{key}: {d[key]} must be at least 1")


FAMILY_CHECKS = {"retinanet": _validate_retinanet, "faster_rcnn": _validate_faster_rcnn, "dfine": _validate_dfine}


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

