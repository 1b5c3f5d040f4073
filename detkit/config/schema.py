"""The config schema: the type of every key of ``params.yaml`` and the ``conf/`` groups, and the
allowed values of the keys that take one of a few. Values live in the files, not here."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class Archive:
    name: str = MISSING
    urls: list[str] = MISSING
    size: int | None = MISSING
    sha256: str = MISSING


@dataclass
class Dataset:
    name: str = MISSING
    layout: str = MISSING
    archives: list[Archive] = MISSING
    max_extracted_bytes: int = MISSING
    local_dir: str | None = MISSING
    label_map: str | None = MISSING


@dataclass
class Split:
    train_fraction: float = MISSING
    seed: int = MISSING


@dataclass
class TFRecord:
    train_shards: int = MISSING
    val_shards: int = MISSING


# ---- model group (conf/model/<name>.yaml): the keys every family has, then each family's own


@dataclass
class ServingMemory:
    base: float = MISSING
    per_image: float = MISSING


@dataclass
class Detection:
    max_detections: int = MISSING
    score_threshold: float = MISSING


@dataclass
class Model:
    """Every model file's keys; ``family`` picks the schema of the rest (``MODEL_SCHEMAS``)."""

    name: str = MISSING
    family: str = MISSING
    pretrained: str = MISSING
    pretrained_sha256: str | None = MISSING
    image_size: int = MISSING
    detection: Detection = field(default_factory=Detection)
    serving_gib: ServingMemory = field(default_factory=ServingMemory)


@dataclass
class ResNet:
    input_conv_filters: list[int] = MISSING
    input_conv_kernel_sizes: list[int] = MISSING
    stackwise_num_filters: list[int] = MISSING
    stackwise_num_blocks: list[int] = MISSING
    stackwise_num_strides: list[int] = MISSING
    block_type: str = MISSING
    use_pre_activation: bool = MISSING


@dataclass
class Anchors:
    num_scales: int = MISSING
    aspect_ratios: list[float] = MISSING
    anchor_size: float = MISSING


@dataclass
class RetinaNetHead:
    num_conv_layers: int = MISSING
    use_group_norm: bool = MISSING


@dataclass
class RetinaNetArchitecture:
    scale: list[float] = MISSING
    offset: list[float] = MISSING
    backbone: ResNet = field(default_factory=ResNet)
    min_level: int = MISSING
    max_level: int = MISSING
    use_p5: bool = MISSING
    use_fpn_batch_norm: bool = MISSING
    anchors: Anchors = field(default_factory=Anchors)
    head: RetinaNetHead = field(default_factory=RetinaNetHead)


@dataclass
class Matching:
    positive_threshold: float = MISSING
    negative_threshold: float = MISSING
    force_match: bool = MISSING


@dataclass
class NmsDetection(Detection):
    max_detections_per_class: int = MISSING
    iou_threshold: float = MISSING
    pre_nms_top_k: int = MISSING


@dataclass
class RetinaNetModel(Model):
    freeze_batch_norm: bool = MISSING
    architecture: RetinaNetArchitecture | None = MISSING
    prior_probability: float = MISSING
    matching: Matching = field(default_factory=Matching)
    detection: NmsDetection = field(default_factory=NmsDetection)


@dataclass
class ResNetArchitecture:
    scale: list[float] = MISSING
    offset: list[float] = MISSING
    backbone: ResNet = field(default_factory=ResNet)


@dataclass
class GridAnchors:
    stride: int = MISSING
    base_size: float = MISSING
    scales: list[float] = MISSING
    aspect_ratios: list[float] = MISSING


@dataclass
class FirstStage:
    conv_depth: int = MISSING
    positive_threshold: float = MISSING
    negative_threshold: float = MISSING
    batch_size: int = MISSING
    positive_fraction: float = MISSING
    nms_iou_threshold: float = MISSING
    pre_nms_top_k: int = MISSING
    proposals_train: int = MISSING
    proposals_infer: int = MISSING
    localization_weight: float = MISSING
    objectness_weight: float = MISSING


@dataclass
class SecondStage:
    crop_size: int = MISSING
    pooled_size: int = MISSING
    batch_size: int = MISSING
    positive_fraction: float = MISSING
    positive_threshold: float = MISSING
    add_groundtruth: bool = MISSING
    localization_weight: float = MISSING
    classification_weight: float = MISSING


@dataclass
class PerClassNms(Detection):
    max_detections_per_class: int = MISSING
    iou_threshold: float = MISSING


@dataclass
class FasterRcnnModel(Model):
    freeze_batch_norm: bool = MISSING
    architecture: ResNetArchitecture | None = MISSING
    anchors: GridAnchors = field(default_factory=GridAnchors)
    box_coder_scales: list[float] = MISSING
    first_stage: FirstStage = field(default_factory=FirstStage)
    second_stage: SecondStage = field(default_factory=SecondStage)
    detection: PerClassNms = field(default_factory=PerClassNms)


@dataclass
class HGNetV2:
    stem_channels: list[int] = MISSING
    stackwise_stage_filters: list[list[int]] = MISSING
    apply_downsample: list[bool] = MISSING
    use_lightweight_conv_block: list[bool] = MISSING
    depths: list[int] = MISSING
    hidden_sizes: list[int] = MISSING
    embedding_size: int = MISSING
    use_learnable_affine_block: bool = MISSING
    hidden_act: str = MISSING
    out_features: list[str] = MISSING


@dataclass
class DFineDecoder:
    decoder_in_channels: list[int] = MISSING
    encoder_hidden_dim: int = MISSING
    hidden_dim: int = MISSING
    learn_initial_query: bool = MISSING
    num_queries: int = MISSING
    feat_strides: list[int] = MISSING
    num_feature_levels: int = MISSING
    encoder_in_channels: list[int] = MISSING
    encode_proj_layers: list[int] = MISSING
    num_attention_heads: int = MISSING
    encoder_ffn_dim: int = MISSING
    num_encoder_layers: int = MISSING
    hidden_expansion: float = MISSING
    depth_multiplier: float = MISSING
    eval_idx: int = MISSING
    num_decoder_layers: int = MISSING
    decoder_attention_heads: int = MISSING
    decoder_ffn_dim: int = MISSING
    decoder_n_points: list[int] = MISSING
    lqe_hidden_dim: int = MISSING
    num_lqe_layers: int = MISSING
    out_features: list[str] = MISSING


@dataclass
class DFineArchitecture:
    scale: list[float] = MISSING
    offset: list[float] = MISSING
    backbone: HGNetV2 = field(default_factory=HGNetV2)
    decoder: DFineDecoder = field(default_factory=DFineDecoder)


@dataclass
class DFineMatcher:
    class_cost: float = MISSING
    bbox_cost: float = MISSING
    ciou_cost: float = MISSING
    alpha: float = MISSING
    gamma: float = MISSING


@dataclass
class DFineLossWeights:
    vfl: float = MISSING
    bbox: float = MISSING
    ciou: float = MISSING
    fgl: float = MISSING
    ddf: float = MISSING


@dataclass
class DFineModel(Model):
    architecture: DFineArchitecture | None = MISSING
    matcher: DFineMatcher = field(default_factory=DFineMatcher)
    loss_weights: DFineLossWeights = field(default_factory=DFineLossWeights)
    ddf_temperature: float = MISSING


MODEL_SCHEMAS: dict[str, type[Model]] = {"retinanet": RetinaNetModel, "faster_rcnn": FasterRcnnModel,
                                         "dfine": DFineModel}


# ---- train section of params.yaml


@dataclass
class Augment:
    hflip: bool = MISSING
    crop_min_scale: float = MISSING
    brightness: float = MISSING
    contrast: float = MISSING


@dataclass
class Train:
    steps: int = MISSING
    batch_size: int = MISSING
    optimizer: str = MISSING
    learning_rate: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    schedule: str = MISSING
    warmup_steps: int = MISSING
    min_lr_fraction: float = MISSING
    clipnorm: float | None = MISSING
    class_loss_weight: float = MISSING
    max_boxes: int = MISSING
    shuffle_buffer: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    seed: int = MISSING
    deterministic: bool = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    keep: str = MISSING
    mixed_precision: str = MISSING
    distribute: str = MISSING
    jit_compile: str = MISSING
    augment: Augment = field(default_factory=Augment)


@dataclass
class Eval:
    batch_size: int = MISSING
    coco_backend: str = MISSING
    num_samples: int = MISSING
    sample_min_score: float = MISSING


@dataclass
class Export:
    model_name: str = MISSING
    version: int | None = MISSING
    max_detections: int = MISSING
    extra_signatures: list[str] = MISSING
    check_images: int = MISSING
    check_tolerance: float = MISSING
    max_image_pixels: int = MISSING
    max_jpeg_scans: int = MISSING


@dataclass
class AwsImage:
    repository: str = MISSING
    tags: dict[str, str] = MISSING


@dataclass
class Serving:
    max_batch_size: int | None = MISSING
    memory_fraction: float = MISSING


@dataclass
class Rollout:
    traffic: str = MISSING
    step_percent: int = MISSING
    wait_interval_s: int = MISSING
    termination_wait_s: int = MISSING
    max_execution_timeout_s: int = MISSING


@dataclass
class Alarms:
    period_s: int = MISSING
    evaluation_periods: int = MISSING
    max_5xx_errors: float = MISSING
    max_model_latency_ms: float = MISSING


@dataclass
class Autoscaling:
    enabled: bool = MISSING
    min_instances: int = MISSING
    max_instances: int = MISSING
    target_invocations_per_instance: float = MISSING
    scale_in_cooldown_s: int = MISSING
    scale_out_cooldown_s: int = MISSING


@dataclass
class Transform:
    instance_type: str = MISSING
    instance_count: int = MISSING
    content_type: str = MISSING
    split_type: str = MISSING
    max_payload_mb: int = MISSING
    max_concurrent_transforms: int | None = MISSING
    wait_minutes: int = MISSING


@dataclass
class Instance:
    vcpus: int = MISSING
    memory_gib: float = MISSING
    hourly_usd: float = MISSING


@dataclass
class Deploy:
    name: str = MISSING
    region: str = MISSING
    role_arn: str | None = MISSING
    image: str = MISSING
    aws_image: AwsImage = field(default_factory=AwsImage)
    bucket: str | None = MISSING
    prefix: str = MISSING
    ecr_repository: str = MISSING
    image_tag: str | None = MISSING
    endpoint_name: str = MISSING
    instance_type: str = MISSING
    instance_count: int = MISSING
    min_ap50: float = MISSING
    wait_minutes: int = MISSING
    project_tag: str = MISSING
    serving: Serving = field(default_factory=Serving)
    rollout: Rollout = field(default_factory=Rollout)
    alarms: Alarms = field(default_factory=Alarms)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    transform: Transform = field(default_factory=Transform)
    instances: dict[str, Instance] = MISSING


@dataclass
class Compute:
    """Where the train stage runs (conf/compute/<name>.yaml): ``local`` has nothing to set."""

    name: str = MISSING


@dataclass
class SageMakerCompute(Compute):
    region: str = MISSING
    role_arn: str | None = MISSING
    bucket: str | None = MISSING
    prefix: str = MISSING
    image: str | None = MISSING
    instance_type: str = MISSING
    instance_count: int = MISSING
    volume_size_gb: int = MISSING
    max_run_minutes: int = MISSING
    spot: bool = MISSING
    max_wait_minutes: int = MISSING
    base_job_name: str = MISSING
    project_tag: str = MISSING
    poll_seconds: int = MISSING
    hourly_usd: dict[str, float] = MISSING


COMPUTE_SCHEMAS: dict[str, type[Compute]] = {"local": Compute, "sagemaker": SageMakerCompute}


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
COCO_BACKENDS = ("faster_coco_eval", "pycocotools")  # detkit.eval.coco.BACKENDS, without importing numpy here
BLOCK_TYPES = ("basic_block", "bottleneck_block", "basic_block_vd", "bottleneck_block_vd")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
KEEP = ("last", "best")
AUTO_SWITCH = ("auto", "true", "false")
DISTRIBUTE = ("auto", "none", "mirrored", "multi_worker")
EXTRA_SIGNATURES = ("image_tensor", "tf_example")
DEPLOY_IMAGES = ("custom", "aws")
TRAFFIC = ("all_at_once", "canary", "linear")
SPLIT_TYPES = ("None", "Line", "RecordIO", "TFRecord")
