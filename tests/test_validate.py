"""detkit.config.validate: each value check refuses the values just past its bounds with its own message,
and takes the values on them. The composed config is changed in memory, key by key, and checked again,
as load_config checks it after composing (test_config holds the composition and the overrides)."""

from __future__ import annotations

import copy

import pytest
from omegaconf import DictConfig, OmegaConf

from detkit.config import load_config
from detkit.config.errors import ConfigError
from detkit.config.validate import validate_values

TINY = "model=retinanet_tiny"  # an architecture of its own; the default model is a preset's
DEPLOY, COMPUTE = "conf/deploy/sagemaker.yaml", "conf/compute/sagemaker.yaml"
RESNET, TINY_FILE = "conf/model/retinanet_resnet50.yaml", "conf/model/retinanet_tiny.yaml"
STEP = "rollout.step_percent {} must be in [1, 50] for canary, [10, 50] for linear"


@pytest.fixture(scope="module")
def composed() -> dict[str, DictConfig]:
    """The real files, composed once per model: the SageMaker compute group, so that its checks run."""
    return {model: load_config(overrides=["dataset=sample", "compute=sagemaker", *model])
            for model in ((), (TINY,))}


def refusal(composed: dict[str, DictConfig], changes: dict, model: tuple[str, ...] = ()) -> str | None:
    """What validating the composed config with ``changes`` (dotted key -> value) says, or None."""
    cfg = copy.deepcopy(composed[model])
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    try:
        validate_values(cfg)
    except ConfigError as exc:
        return str(exc)
    return None


REFUSED = [
    ({"dataset.layout": "vco"}, "dataset.layout: 'vco' is not one of pets, voc (did you mean 'voc'?)"),
    ({"dataset.max_extracted_bytes": 0}, "dataset.max_extracted_bytes: 0 must be at least 1"),
    ({"split.train_fraction": 0.0}, "split.train_fraction: 0.0 must be in (0, 1)"),
    ({"split.train_fraction": 1.0}, "split.train_fraction: 1.0 must be in (0, 1)"),
    ({"tfrecord.train_shards": 0}, "tfrecord.train_shards: 0 must be at least 1"),
    ({"tfrecord.val_shards": 0}, "tfrecord.val_shards: 0 must be at least 1"),
    ({"eval.coco_backend": "pycocotool"},
     "eval.coco_backend: 'pycocotool' is not one of faster_coco_eval, pycocotools (did you mean 'pycocotools'?)"),
    ({"eval.batch_size": 0}, "eval.batch_size: 0 must be at least 1"),
    # export
    ({"export.model_name": "-pets"}, "export.model_name: '-pets' must be letters, digits, '_', '.', '-' (it is a "
                                     "folder name and part of the serving URL)"),
    ({"export.model_name": "pet model"}, "export.model_name: 'pet model' must be letters, digits, '_', '.', '-' (it "
                                         "is a folder name and part of the serving URL)"),
    ({"export.version": 0}, "export.version: 0 must be at least 1, or null for the next free one"),
    ({"export.extra_signatures": ["tf_example", "image_tensors"]},
     "export.extra_signatures: 'image_tensors' is not one of image_tensor, tf_example (did you mean 'image_tensor'?)"),
    ({"export.max_detections": 0}, "export.max_detections and export.check_images must be at least 1"),
    ({"export.check_images": 0}, "export.max_detections and export.check_images must be at least 1"),
    ({"export.check_tolerance": 0.0}, "export.check_tolerance: 0.0 must be positive"),
    ({"export.max_image_pixels": 0}, "export.max_image_pixels: 0 must be at least 1 (width x height of the largest "
                                     "image the served model decodes)"),
    ({"export.max_jpeg_scans": 0}, "export.max_jpeg_scans: 0 must be at least 1 (every JPEG has a scan)"),
    # compute: SageMaker
    ({"compute.instance_type": "g5.xlarge"}, f"{COMPUTE}: instance_type 'g5.xlarge' is not a SageMaker instance type "
                                             "(ml.<family>.<size>, e.g. ml.g5.xlarge)"),
    ({"compute.instance_type": "ml.g5.xlarge.2"}, f"{COMPUTE}: instance_type 'ml.g5.xlarge.2' is not a SageMaker "
                                                  "instance type (ml.<family>.<size>, e.g. ml.g5.xlarge)"),
    ({"compute.instance_type": "ml.G5.xlarge"}, f"{COMPUTE}: instance_type 'ml.G5.xlarge' is not a SageMaker instance "
                                                "type (ml.<family>.<size>, e.g. ml.g5.xlarge)"),
    *[({f"compute.{key}": 0}, f"{COMPUTE}: {key}: 0 must be at least 1")
      for key in ("instance_count", "volume_size_gb", "max_run_minutes", "max_wait_minutes", "poll_seconds")],
    ({"compute.spot": True, "compute.max_run_minutes": 720, "compute.max_wait_minutes": 719},
     f"{COMPUTE}: max_wait_minutes (719) must be at least max_run_minutes (720) with spot: SageMaker counts the run "
     "within the wait"),
    *[({"compute.base_job_name": name}, f"{COMPUTE}: base_job_name '{name}' must be at most 44 letters, digits and "
                                        "inner hyphens")
      for name in ("-train", "train-", "pets_train", "a" * 45)],
    *[({"compute.prefix": prefix}, f"{COMPUTE}: prefix '{prefix}' must be an S3 key prefix without leading or "
                                   "trailing '/'")
      for prefix in ("/pets", "pets/", "pets//runs", "pets runs")],
    # deploy
    ({"deploy.image": "ecr"}, "deploy.image: 'ecr' is not one of custom, aws"),
    ({"deploy.rollout.traffic": "canery"},
     "deploy.rollout.traffic: 'canery' is not one of all_at_once, canary, linear (did you mean 'canary'?)"),
    ({"deploy.transform.split_type": "none"},
     "deploy.transform.split_type: 'none' is not one of None, Line, RecordIO, TFRecord (did you mean 'None'?)"),
    ({"deploy.instance_count": 0}, f"{DEPLOY}: instance_count must be >= 1, min_ap50 in [0, 1]"),
    ({"deploy.min_ap50": -0.01}, f"{DEPLOY}: instance_count must be >= 1, min_ap50 in [0, 1]"),
    ({"deploy.min_ap50": 1.01}, f"{DEPLOY}: instance_count must be >= 1, min_ap50 in [0, 1]"),
    ({"deploy.serving.max_batch_size": 0}, f"{DEPLOY}: serving.max_batch_size must be >= 1"),
    ({"deploy.serving.memory_fraction": 0.0}, f"{DEPLOY}: serving.memory_fraction must be in (0, 1]"),
    ({"deploy.serving.memory_fraction": 1.01}, f"{DEPLOY}: serving.memory_fraction must be in (0, 1]"),
    ({"deploy.rollout.traffic": "canary", "deploy.rollout.step_percent": 0}, f"{DEPLOY}: {STEP.format(0)}"),
    ({"deploy.rollout.traffic": "canary", "deploy.rollout.step_percent": 51}, f"{DEPLOY}: {STEP.format(51)}"),
    ({"deploy.rollout.traffic": "linear", "deploy.rollout.step_percent": 9}, f"{DEPLOY}: {STEP.format(9)}"),
    ({"deploy.rollout.traffic": "linear", "deploy.rollout.step_percent": 51}, f"{DEPLOY}: {STEP.format(51)}"),
    *[({f"deploy.rollout.{key}": value},
       f"{DEPLOY}: rollout.wait_interval_s and rollout.termination_wait_s must be in [0, 3600]")
      for key in ("wait_interval_s", "termination_wait_s") for value in (-1, 3601)],
    *[({"deploy.rollout.max_execution_timeout_s": value},
       f"{DEPLOY}: rollout.max_execution_timeout_s must be in [600, 14400]") for value in (599, 14401)],
    *[({"deploy.alarms.period_s": value}, f"{DEPLOY}: alarms.period_s must be a multiple of 60")
      for value in (0, 59, 90)],
    ({"deploy.alarms.evaluation_periods": 0}, f"{DEPLOY}: alarms.evaluation_periods must be >= 1"),
    ({"deploy.autoscaling.min_instances": 0}, f"{DEPLOY}: autoscaling needs 1 <= min_instances <= max_instances"),
    ({"deploy.autoscaling.min_instances": 3, "deploy.autoscaling.max_instances": 2},
     f"{DEPLOY}: autoscaling needs 1 <= min_instances <= max_instances"),
    ({"deploy.autoscaling.target_invocations_per_instance": 0.0},
     f"{DEPLOY}: autoscaling.target_invocations_per_instance must be > 0"),
    ({"deploy.autoscaling.scale_in_cooldown_s": -1}, f"{DEPLOY}: autoscaling cool-downs must be >= 0"),
    ({"deploy.autoscaling.scale_out_cooldown_s": -1}, f"{DEPLOY}: autoscaling cool-downs must be >= 0"),
    *[({f"deploy.transform.{key}": value},
       f"{DEPLOY}: transform.instance_count must be >= 1, transform.max_payload_mb in [1, 100]")
      for key, value in (("instance_count", 0), ("max_payload_mb", 0), ("max_payload_mb", 101))],
    *[({"deploy.transform.max_payload_mb": payload, "deploy.transform.max_concurrent_transforms": count},
       f"{DEPLOY}: transform.max_concurrent_transforms x transform.max_payload_mb must be in [1, 100] (SageMaker's "
       "limit)") for payload, count in ((6, 0), (10, 11), (6, 17))],
    # model: both families' checks, the preset's model
    ({"model.serving_gib.base": 0.0},
     f"{RESNET}: serving_gib.base and serving_gib.per_image must be positive (GiB)"),
    ({"model.serving_gib.per_image": 0.0},
     f"{RESNET}: serving_gib.base and serving_gib.per_image must be positive (GiB)"),
    ({"model.image_size": 31}, f"{RESNET}: image_size: 31 must be at least 32"),
    *[({f"model.detection.{key}": value},
       f"{RESNET}: detection: score_threshold must be in [0, 1), max_detections >= 1")
      for key, value in (("score_threshold", -0.01), ("score_threshold", 1.0), ("max_detections", 0))],
    ({"model.pretrained": "none"}, f"{RESNET}: 'architecture: null' takes the architecture from the preset in "
                                   "'pretrained', which is 'none'"),
    ({"model.image_size": 48}, f"{RESNET}: image_size: 48 must be a multiple of 32"),
    ({"model.prior_probability": 0.0}, f"{RESNET}: prior_probability: 0.0 must be in (0, 1)"),
    ({"model.prior_probability": 1.0}, f"{RESNET}: prior_probability: 1.0 must be in (0, 1)"),
    *[({f"model.matching.{key}": value}, f"{RESNET}: matching: need 0 < negative_threshold <= positive_threshold "
                                         "<= 1")
      for key, value in (("negative_threshold", 0.0), ("negative_threshold", 0.6), ("positive_threshold", 1.01))],
    *[({f"model.detection.{key}": value}, f"{RESNET}: detection: iou_threshold must be in (0, 1], "
                                          "max_detections_per_class and pre_nms_top_k >= 1")
      for key, value in (("iou_threshold", 0.0), ("iou_threshold", 1.01), ("max_detections_per_class", 0),
                         ("pre_nms_top_k", 0))],
    # train
    *[({f"train.{key}": 0}, f"train.{key}: 0 must be at least 1")
      for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "max_boxes", "shuffle_buffer")],
    ({"train.optimizer": "sgdm"}, "train.optimizer: 'sgdm' is not one of adam, adamw, sgd (did you mean 'sgd'?)"),
    ({"train.optimizer": "adagrad"},  # as alike as a hint goes: half their letters in common
     "train.optimizer: 'adagrad' is not one of adam, adamw, sgd (did you mean 'adam'?)"),
    ({"train.schedule": "cosin"}, "train.schedule: 'cosin' is not one of cosine, constant (did you mean 'cosine'?)"),
    ({"train.learning_rate": 0.0}, "train.learning_rate: 0.0 must be positive"),
    ({"train.warmup_steps": -1}, "train.warmup_steps: -1 must be in [0, train.steps=6000)"),
    ({"train.warmup_steps": 6000}, "train.warmup_steps: 6000 must be in [0, train.steps=6000)"),
    ({"train.min_lr_fraction": -0.01}, "train.min_lr_fraction: -0.01 must be in [0, 1]"),
    ({"train.min_lr_fraction": 1.01}, "train.min_lr_fraction: 1.01 must be in [0, 1]"),
    ({"train.clipnorm": 0.0}, "train.clipnorm: 0.0 must be positive, or null for no clipping"),
    ({"train.class_loss_weight": 0.0}, "train.class_loss_weight: 0.0 must be positive"),
    *[({f"train.{key}": value}, "train.weight_decay must be >= 0 and train.momentum in [0, 1)")
      for key, value in (("weight_decay", -0.01), ("momentum", -0.01), ("momentum", 1.0))],
    *[({f"train.{key}": value}, "train.log_every must be at least 1 and train.eval_every at least 0 (0 = off)")
      for key, value in (("log_every", 0), ("eval_every", -1))],
    ({"train.keep": "first"}, "train.keep: 'first' is not one of last, best"),
    ({"train.keep": "best", "train.eval_every": 0},
     "train.keep: 'best' needs validation during training: set train.eval_every > 0"),
    ({"train.mixed_precision": "on"}, "train.mixed_precision: 'on' is not one of auto, true, false"),
    ({"train.jit_compile": "xla"}, "train.jit_compile: 'xla' is not one of auto, true, false"),
    ({"train.distribute": "multiworker"},
     "train.distribute: 'multiworker' is not one of auto, none, mirrored, multi_worker (did you mean 'multi_worker'?)"),
    ({"train.augment.crop_min_scale": 0.09},
     "train.augment.crop_min_scale: 0.09 must be in [0.1, 1] (1 = no crop)"),
    ({"train.augment.crop_min_scale": 1.01},
     "train.augment.crop_min_scale: 1.01 must be in [0.1, 1] (1 = no crop)"),
    *[({f"train.augment.{key}": value}, "train.augment.brightness and .contrast must be in [0, 1)")
      for key in ("brightness", "contrast") for value in (-0.01, 1.0)],
]

REFUSED_TINY = [  # a model that builds its own architecture
    ({"model.pretrained": "kaggle://keras/retinanet"},
     f"{TINY_FILE}: 'architecture' builds a model from scratch, so 'pretrained' must be 'none' (got "
     "'kaggle://keras/retinanet'); set 'architecture: null' to fine-tune the preset's"),
    ({"model.image_size": 136}, f"{TINY_FILE}: image_size: 136 must be a multiple of 16"),
    ({"model.image_size": 144, "model.architecture.max_level": 6}, f"{TINY_FILE}: image_size: 144 must be a multiple "
                                                                   "of 32"),
    ({"model.architecture.scale": [0.5, 0.5]},
     f"{TINY_FILE}: architecture.scale: needs 1 or 3 values (per RGB channel), got 2"),
    ({"model.architecture.offset": []},
     f"{TINY_FILE}: architecture.offset: needs 1 or 3 values (per RGB channel), got 0"),
    ({"model.architecture.min_level": 1},
     f"{TINY_FILE}: architecture: min_level 1, max_level 4: need 2 <= min <= max"),
    ({"model.architecture.min_level": 5},
     f"{TINY_FILE}: architecture: min_level 5, max_level 4: need 2 <= min <= max"),
    ({"model.architecture.backbone.block_type": "basic"},
     f"{TINY_FILE}: architecture.backbone.block_type: 'basic' is not one of basic_block, bottleneck_block, "
     "basic_block_vd, bottleneck_block_vd (did you mean 'basic_block'?)"),
    *[({f"model.architecture.backbone.stackwise_num_{key}": [1, 1]},
       f"{TINY_FILE}: architecture.backbone.stackwise_num_filters/_blocks/_strides must have the same length")
      for key in ("blocks", "strides")],
    ({"model.architecture.backbone.stackwise_num_filters": [32, 128, 128]},
     f"{TINY_FILE}: architecture.backbone.stackwise_num_filters[0]: KerasHub's ResNet needs 64, got 32"),
    ({"model.architecture.min_level": 5, "model.architecture.max_level": 5},
     f"{TINY_FILE}: architecture.min_level 5: the backbone's 3 stacks only reach P4"),
    *[({f"model.architecture.anchors.{key}": value},
       f"{TINY_FILE}: architecture.anchors: need num_scales >= 1 and positive aspect_ratios")
      for key, value in (("num_scales", 0), ("aspect_ratios", []), ("aspect_ratios", [1.0, 0.0]))],
]

ACCEPTED = [  # every value on a bound, and the choices besides the files' own
    {"dataset.layout": "voc"}, {"dataset.max_extracted_bytes": 1},
    {"split.train_fraction": 0.01}, {"split.train_fraction": 0.99},
    {"tfrecord.train_shards": 1, "tfrecord.val_shards": 1},
    {"eval.coco_backend": "pycocotools", "eval.batch_size": 1},
    {"export.model_name": "P", "export.version": 1}, {"export.model_name": "9pets_v1.2-b", "export.version": None},
    {"export.extra_signatures": ["image_tensor", "tf_example"]},
    {"export.max_detections": 1, "export.check_images": 1, "export.check_tolerance": 1e-9,
     "export.max_image_pixels": 1, "export.max_jpeg_scans": 1},
    {"compute.instance_type": "ml.inf2-x.48xlarge"},
    {"compute.instance_count": 1, "compute.volume_size_gb": 1, "compute.poll_seconds": 1, "compute.spot": True,
     "compute.max_run_minutes": 1, "compute.max_wait_minutes": 1},
    {"compute.spot": False, "compute.max_run_minutes": 720, "compute.max_wait_minutes": 1},
    {"compute.base_job_name": "a"}, {"compute.base_job_name": "a" * 44}, {"compute.base_job_name": "Pets--train2"},
    {"compute.prefix": "p"}, {"compute.prefix": "pets/runs/a!_.*'()-b"},
    {"deploy.image": "aws", "deploy.transform.split_type": "Line"},
    {"deploy.instance_type": "ml.g4dn.xlarge", "deploy.transform.instance_type": "ml.c5.large"},
    {"deploy.instance_count": 1, "deploy.min_ap50": 0.0}, {"deploy.min_ap50": 1.0},
    {"deploy.serving.max_batch_size": 1, "deploy.serving.memory_fraction": 1.0},
    {"deploy.serving.max_batch_size": None, "deploy.serving.memory_fraction": 0.01},
    {"deploy.rollout.traffic": "canary", "deploy.rollout.step_percent": 1},
    {"deploy.rollout.traffic": "canary", "deploy.rollout.step_percent": 50},
    {"deploy.rollout.traffic": "linear", "deploy.rollout.step_percent": 10},
    {"deploy.rollout.traffic": "linear", "deploy.rollout.step_percent": 50},
    {"deploy.rollout.traffic": "all_at_once", "deploy.rollout.step_percent": 0},
    {"deploy.rollout.wait_interval_s": 0, "deploy.rollout.termination_wait_s": 0},
    {"deploy.rollout.wait_interval_s": 3600, "deploy.rollout.termination_wait_s": 3600},
    {"deploy.rollout.max_execution_timeout_s": 600}, {"deploy.rollout.max_execution_timeout_s": 14400},
    {"deploy.alarms.period_s": 60, "deploy.alarms.evaluation_periods": 1}, {"deploy.alarms.period_s": 120},
    {"deploy.autoscaling.min_instances": 1, "deploy.autoscaling.max_instances": 1},
    {"deploy.autoscaling.min_instances": 2, "deploy.autoscaling.max_instances": 2},
    {"deploy.autoscaling.target_invocations_per_instance": 0.01, "deploy.autoscaling.scale_in_cooldown_s": 0,
     "deploy.autoscaling.scale_out_cooldown_s": 0},
    {"deploy.transform.instance_count": 1, "deploy.transform.max_payload_mb": 1,
     "deploy.transform.max_concurrent_transforms": 1},
    {"deploy.transform.max_payload_mb": 100, "deploy.transform.max_concurrent_transforms": None},
    {"deploy.transform.max_payload_mb": 10, "deploy.transform.max_concurrent_transforms": 10},
    {"model.serving_gib.base": 0.01, "model.serving_gib.per_image": 0.001, "model.image_size": 32},
    {"model.detection.score_threshold": 0.0, "model.detection.max_detections": 1},
    {"model.detection.score_threshold": 0.99},
    {"model.prior_probability": 0.001}, {"model.prior_probability": 0.999},
    {"model.matching.negative_threshold": 0.5, "model.matching.positive_threshold": 0.5},
    {"model.matching.negative_threshold": 0.01, "model.matching.positive_threshold": 1.0},
    {"model.detection.iou_threshold": 1.0, "model.detection.max_detections_per_class": 1,
     "model.detection.pre_nms_top_k": 1},
    {"model.detection.iou_threshold": 0.01},
    {"train.steps": 1, "train.warmup_steps": 0, "train.batch_size": 1, "train.checkpoint_every": 1,
     "train.keep_checkpoints": 1, "train.max_boxes": 1, "train.shuffle_buffer": 1},
    {"train.optimizer": "sgd", "train.schedule": "constant", "train.learning_rate": 1e-9},
    {"train.optimizer": "adamw", "train.warmup_steps": 5999},
    {"train.min_lr_fraction": 0.0, "train.clipnorm": None}, {"train.min_lr_fraction": 1.0, "train.clipnorm": 1e-9},
    {"train.class_loss_weight": 0.001, "train.weight_decay": 0.0, "train.momentum": 0.0},
    {"train.momentum": 0.99, "train.log_every": 1, "train.eval_every": 0},
    {"train.keep": "best", "train.eval_every": 1},
    {"train.mixed_precision": "True", "train.jit_compile": "false"},
    {"train.mixed_precision": "false", "train.jit_compile": "TRUE"},
    {"train.distribute": "multi_worker"}, {"train.distribute": "none"},
    {"train.augment.crop_min_scale": 0.1, "train.augment.brightness": 0.0, "train.augment.contrast": 0.0},
    {"train.augment.crop_min_scale": 1.0, "train.augment.brightness": 0.99, "train.augment.contrast": 0.99},
]

ACCEPTED_TINY = [
    {"model.image_size": 144},  # a multiple of 16, P4's stride, not of 32
    {"model.architecture.scale": [0.5, 0.5, 0.5], "model.architecture.offset": [-1.0, -1.0, -1.0]},
    {"model.architecture.min_level": 2, "model.architecture.max_level": 2},
    {"model.architecture.min_level": 4, "model.architecture.max_level": 4},
    {"model.architecture.backbone.block_type": "bottleneck_block_vd"},
    {"model.architecture.anchors.num_scales": 1, "model.architecture.anchors.aspect_ratios": [0.01, 2.0]},
]


@pytest.mark.parametrize("model, changes, message", [((), *case) for case in REFUSED]
                         + [((TINY,), *case) for case in REFUSED_TINY], ids=str)
def test_a_value_past_its_bound_is_refused_with_its_message(composed, model, changes, message):
    assert refusal(composed, changes, model) == message


@pytest.mark.parametrize("model, changes", [((), case) for case in ACCEPTED]
                         + [((TINY,), case) for case in ACCEPTED_TINY], ids=str)
def test_a_value_on_its_bound_is_taken(composed, model, changes):
    assert refusal(composed, changes, model) is None
