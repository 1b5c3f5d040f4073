"""Faster R-CNN with a ResNet: the ``faster_rcnn`` family (docs/models.md), after the TF Object
Detection API's ``faster_rcnn_resnet101_pets.config``.

Architecture
------------
- **Features**: a KerasHub ``ResNetBackbone`` of the ResNet's first three stacks (conv2-conv4),
  stride ``anchors.stride`` (16).
- **First stage (RPN)**: a 3x3 conv (``first_stage.conv_depth``) then per location one
  objectness logit and 4 box deltas for each anchor (``anchors.scales`` x ``anchors.aspect_ratios``
  times ``anchors.base_size``). The decoded boxes go through NMS (``first_stage.nms_iou_threshold``),
  keeping ``first_stage.proposals_train`` / ``proposals_infer`` proposals.
- **Second stage**: each proposal cropped from the features by ``tf.image.crop_and_resize`` to
  ``second_stage.crop_size`` squared, max-pooled to ``pooled_size`` squared, through the ResNet's
  fourth stack (conv5) at stride 1 and a global average pool; a dense softmax over the classes
  and background, and class-specific box deltas.
- **Box coder**: the TF OD API's Faster R-CNN coder (center deltas times ``box_coder_scales``
  10/10/5/5, log size ratios), in coordinates normalised to the square input.

Training (``compute_loss``, inside Keras' ``fit``): anchors matched to the targets by IoU
(``first_stage`` thresholds, every box forced to its best anchor), ``first_stage.batch_size``
anchors sampled per image at ``positive_fraction``; the proposals (the target boxes added when
``second_stage.add_groundtruth``) matched at ``second_stage.positive_threshold`` and
``second_stage.batch_size`` sampled per image. Losses: sigmoid cross-entropy (objectness),
softmax cross-entropy (classes), smooth L1 (boxes), each normalised by the sampled count per
image and weighted by the model file. Padded target rows (label -1) take part in nothing.

Detections (``detect``): the inference proposals, the class softmax without the background,
per-class boxes decoded from their proposal, and per-class NMS (``detection``).

Starting weights: ``pretrained: none`` builds ``architecture`` at random; a preset folder (the
``pretrained`` stage's copy of KerasHub's ``resnet_101_imagenet``) gives the ResNet's weights
to the features and the conv5 head by layer name, and its input scaling; the RPN and the
classifier's dense layers are new.

Trained model (``save`` / ``load``): ``faster_rcnn.json`` (the model's config) and
``model.weights.h5``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras.src.losses.loss import scale_loss_for_distribution
from keras_hub.src.models.resnet.resnet_backbone import apply_stack
from omegaconf import OmegaConf

from detkit.models.family import LABEL_OFFSET, Built, KerasModelFamily, ModelError, per_channel

RESNET_KEYS = ("input_conv_filters", "input_conv_kernel_sizes", "stackwise_num_filters", "stackwise_num_blocks",
               "stackwise_num_strides", "block_type", "use_pre_activation")
FEATURE_STACKS = 3  # conv2-conv4 give the features; the fourth stack (conv5) is the box head
LOSSES = ("rpn_box_loss", "rpn_objectness_loss", "box_loss", "class_loss")


# ---------------------------------------------------------------------------- boxes


def grid_anchors(size: int, stride: int, base_size: float, scales, aspect_ratios) -> np.ndarray:
    """Anchors of a ``size`` px square input, normalised yxyx [H * W * A, 4], in the order the
    RPN's outputs reshape to (row, column, then scale-major anchor). Aspect ratio = width / height."""
    cells = size // stride
    shapes = [(base_size * s / math.sqrt(r), base_size * s * math.sqrt(r)) for s in scales for r in aspect_ratios]
    hw = np.array(shapes, np.float32)  # [A, 2]
    centers = (np.arange(cells, dtype=np.float32) + 0.5) * stride
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    c = np.stack([cy, cx], -1).reshape(-1, 1, 2)  # [H*W, 1, 2]
    boxes = np.concatenate([c - hw / 2, c + hw / 2], -1)  # [H*W, A, 4] yxyx
    return (boxes.reshape(-1, 4) / size).astype(np.float32)


def _center_size(boxes):
    h, w = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + h / 2, boxes[..., 1] + w / 2, h, w


def encode(boxes, anchors, scales):
    """The Faster R-CNN box coder: ``boxes`` relative to ``anchors`` (both yxyx) -> [ty, tx, th, tw]."""
    y, x, h, w = _center_size(boxes)
    ya, xa, ha, wa = _center_size(anchors)
    eps = 1e-8
    h, w, ha, wa = (tf.maximum(v, eps) for v in (h, w, ha, wa))
    return tf.stack([(y - ya) / ha * scales[0], (x - xa) / wa * scales[1],
                     tf.math.log(h / ha) * scales[2], tf.math.log(w / wa) * scales[3]], -1)


def decode(deltas, anchors, scales):
    """The inverse of ``encode``: deltas [..., 4] on ``anchors`` -> yxyx boxes."""
    ya, xa, ha, wa = _center_size(anchors)
    clip = math.log(1000.0 / 16)  # as torchvision: no exp overflow from a wild delta
    y = deltas[..., 0] / scales[0] * ha + ya
    x = deltas[..., 1] / scales[1] * wa + xa
    h = tf.exp(tf.minimum(deltas[..., 2] / scales[2], clip)) * ha
    w = tf.exp(tf.minimum(deltas[..., 3] / scales[3], clip)) * wa
    return tf.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], -1)


def pairwise_iou(a, b):
    """IoU of yxyx boxes ``a`` [B, N, 4] and ``b`` [B, M, 4] -> [B, N, M]."""
    a, b = a[:, :, None, :], b[:, None, :, :]
    inter_h = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_w = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = inter_h * inter_w
    area = lambda t: tf.maximum(t[..., 2] - t[..., 0], 0.0) * tf.maximum(t[..., 3] - t[..., 1], 0.0)  # noqa: E731
    return inter / tf.maximum(area(a) + area(b) - inter, 1e-8)


def balanced_sample(positive, negative, size: int, positive_fraction: float):
    """Per row, at most ``size * positive_fraction`` random positives and negatives up to ``size``
    in all: the sampled [B, N] mask (TF OD API's balanced minibatch sampler)."""
    def ranks(mask):  # a random order among the masked entries; the others rank last
        order = tf.argsort(tf.where(mask, tf.random.uniform(tf.shape(mask)), -1.0), axis=-1, direction="DESCENDING")
        return tf.argsort(order, axis=-1)

    pos = positive & (ranks(positive) < int(size * positive_fraction))
    room = size - tf.reduce_sum(tf.cast(pos, "int32"), -1, keepdims=True)
    return pos | (negative & (ranks(negative) < room))


def match(boxes, valid_boxes, gt, gt_valid):
    """Best target per box: (IoU [B, N], index [B, N]); padded targets and boxes never match."""
    iou = pairwise_iou(boxes, gt)
    iou = tf.where(gt_valid[:, None, :] & valid_boxes[:, :, None], iou, -1.0)
    return tf.reduce_max(iou, -1), tf.argmax(iou, -1, output_type="int32"), iou


def smooth_l1(a, b):
    d = tf.abs(a - b)
    return tf.reduce_sum(tf.where(d < 1.0, 0.5 * d * d, d - 0.5), -1)


def per_image_mean(values, weights):
    """Sum over each image's sampled entries / their count, averaged over the batch."""
    count = tf.maximum(tf.reduce_sum(weights, -1), 1.0)
    return tf.reduce_mean(tf.reduce_sum(values * weights, -1) / count)


# ---------------------------------------------------------------------------- the model


def _box_head(backbone_config: dict, channels: int, pooled: int, dtype=None) -> keras.Model:
    """The ResNet's fourth stack (conv5) at stride 1 on pooled crops, then a global average pool;
    named as in the full ResNet (``stack3_*``) so its pretrained weights load by name."""
    inputs = keras.Input((pooled, pooled, channels))
    x = apply_stack(inputs, filters=backbone_config["stackwise_num_filters"][FEATURE_STACKS],
                    blocks=backbone_config["stackwise_num_blocks"][FEATURE_STACKS], stride=1,
                    block_type=backbone_config["block_type"], use_pre_activation=backbone_config["use_pre_activation"],
                    first_shortcut=True, dtype=dtype, name=f"stack{FEATURE_STACKS}")
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="box_head_pool")(x)
    return keras.Model(inputs, x, name="box_head")


@keras.saving.register_keras_serializable(package="detkit")
class FasterRCNN(keras.Model):
    """The two-stage detector (module doc). ``call`` gives the RPN's outputs and the features;
    ``compute_loss`` runs the second stage on sampled proposals; ``detections`` decodes.

    Args: the model file's sections as plain dicts (``num_classes``: 0-based classes, no background;
    ``backbone``: ResNetBackbone keys for all four stacks).
    """

    def __init__(self, num_classes, image_size, backbone, scale, offset, anchors, first_stage, second_stage,
                 box_coder_scales, freeze_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.image_size = int(num_classes), int(image_size)
        self.backbone_config = {k: backbone[k] for k in RESNET_KEYS}
        self.scale, self.offset = [float(v) for v in scale], [float(v) for v in offset]
        self.anchor_config, self.first_stage, self.second_stage = dict(anchors), dict(first_stage), dict(second_stage)
        self.box_coder_scales = [float(v) for v in box_coder_scales]
        self.freeze_batch_norm = bool(freeze_batch_norm)
        b = self.backbone_config
        self.features = keras_hub.models.ResNetBackbone(
            **{k: (list(b[k][:FEATURE_STACKS]) if k.startswith("stackwise") else b[k]) for k in RESNET_KEYS},
            image_shape=(self.image_size, self.image_size, 3), dtype=self.dtype_policy, name="features")
        channels = int(self.features.output.shape[-1])
        a = self.anchor_config
        self.anchors = tf.constant(grid_anchors(self.image_size, int(a["stride"]), float(a["base_size"]),
                                                a["scales"], a["aspect_ratios"]))
        self.anchors_per_location = len(a["scales"]) * len(a["aspect_ratios"])
        f = self.first_stage
        self.rpn_conv = keras.layers.Conv2D(int(f["conv_depth"]), 3, padding="same", activation="relu",
                                            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                            dtype=self.dtype_policy, name="rpn_conv")
        self.rpn_objectness = keras.layers.Conv2D(self.anchors_per_location, 1, dtype=self.dtype_policy,
                                                  kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                                  name="rpn_objectness")
        self.rpn_box = keras.layers.Conv2D(4 * self.anchors_per_location, 1, dtype=self.dtype_policy,
                                           kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                           name="rpn_box")
        s = self.second_stage
        self.pool = keras.layers.MaxPooling2D(int(s["crop_size"]) // int(s["pooled_size"]), dtype=self.dtype_policy,
                                              name="crop_pool")
        self.box_head = _box_head(b, channels, int(s["pooled_size"]), self.dtype_policy)
        self.class_logits = keras.layers.Dense(self.num_classes + 1, dtype=self.dtype_policy, name="class_logits",
                                               kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))
        self.box_deltas = keras.layers.Dense(4 * self.num_classes, dtype=self.dtype_policy, name="box_deltas",
                                             kernel_initializer=keras.initializers.RandomNormal(stddev=0.001))
        head_width = int(self.box_head.output.shape[-1])
        self.rpn_conv.build((None, None, None, channels))
        self.rpn_objectness.build((None, None, None, int(f["conv_depth"])))
        self.rpn_box.build((None, None, None, int(f["conv_depth"])))
        self.class_logits.build((None, head_width))
        self.box_deltas.build((None, head_width))
        self.trackers = [keras.metrics.Mean(name=n) for n in LOSSES]
        if self.freeze_batch_norm:
            for model in (self.features, self.box_head):
                for layer in model.layers:
                    if isinstance(layer, keras.layers.BatchNormalization):
                        layer.trainable = False

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "image_size": self.image_size,
                "backbone": self.backbone_config, "scale": self.scale, "offset": self.offset,
                "anchors": self.anchor_config, "first_stage": self.first_stage, "second_stage": self.second_stage,
                "box_coder_scales": self.box_coder_scales, "freeze_batch_norm": self.freeze_batch_norm}

    def call(self, images, training=False):
        x = tf.cast(images, "float32") * tf.constant(self.scale) + tf.constant(self.offset)
        features = self.features(x, training=training)
        r = self.rpn_conv(features)
        batch = tf.shape(features)[0]
        return {"features": features,
                "objectness": tf.reshape(tf.cast(self.rpn_objectness(r), "float32"), [batch, -1]),
                "rpn_deltas": tf.reshape(tf.cast(self.rpn_box(r), "float32"), [batch, -1, 4])}

    # ---- stages shared by training and detection

    def proposals(self, outputs, count: int):
        """The RPN's decoded boxes after NMS: normalised yxyx [B, count, 4] (no gradient) and a
        validity mask [B, count]."""
        f = self.first_stage
        boxes = tf.clip_by_value(decode(tf.stop_gradient(outputs["rpn_deltas"]), self.anchors, self.box_coder_scales),
                                 0.0, 1.0)
        scores = tf.sigmoid(tf.stop_gradient(outputs["objectness"]))
        k = min(int(f["pre_nms_top_k"]), int(self.anchors.shape[0]))
        scores, top = tf.math.top_k(scores, k=k)
        boxes = tf.gather(boxes, top, batch_dims=1)
        boxes, _, _, valid = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], scores[:, :, None], max_output_size_per_class=count, max_total_size=count,
            iou_threshold=float(f["nms_iou_threshold"]), score_threshold=-1.0, pad_per_class=False,
            clip_boxes=True)
        return boxes, tf.sequence_mask(valid, count)

    def classify(self, features, boxes, training=False):
        """Second stage on normalised yxyx ``boxes`` [B, P, 4] -> class logits [B, P, C + 1] and
        class-specific deltas [B, P, C, 4], float32."""
        batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
        size = int(self.second_stage["crop_size"])
        crops = tf.image.crop_and_resize(tf.cast(features, "float32"), tf.reshape(boxes, [-1, 4]),
                                         tf.repeat(tf.range(batch), count), [size, size])
        x = self.box_head(self.pool(tf.cast(crops, self.compute_dtype)), training=training)
        logits = tf.reshape(tf.cast(self.class_logits(x), "float32"), [batch, count, self.num_classes + 1])
        deltas = tf.reshape(tf.cast(self.box_deltas(x), "float32"), [batch, count, self.num_classes, 4])
        return logits, deltas

    # ---- training

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        gt, labels = tf.cast(y["boxes"], "float32"), tf.cast(y["labels"], "float32")
        gt_valid = labels >= 0
        f, s, scales = self.first_stage, self.second_stage, self.box_coder_scales

        # First stage: anchors against the targets.
        batch = tf.shape(gt)[0]
        anchors = tf.broadcast_to(self.anchors[None], [batch, *self.anchors.shape])
        best, index, iou = match(anchors, tf.ones(tf.shape(anchors)[:2], bool), gt, gt_valid)
        # Every target's best anchor is positive for it, whatever the IoU (TF OD API force_match).
        best_anchor = tf.argmax(iou, 1, output_type="int32")  # [B, R]
        forced = tf.one_hot(best_anchor, tf.shape(anchors)[1], axis=1, on_value=True, off_value=False)
        forced &= gt_valid[:, None, :]
        index = tf.where(tf.reduce_any(forced, -1), tf.argmax(tf.cast(forced, "int32"), -1, output_type="int32"),
                         index)
        positive = (best >= float(f["positive_threshold"])) | tf.reduce_any(forced, -1)
        negative = (best < float(f["negative_threshold"])) & ~positive  # an image without targets: all
        sampled = tf.cast(balanced_sample(positive, negative, int(f["batch_size"]), float(f["positive_fraction"])),
                          "float32")
        objectness = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(positive, "float32"), y_pred["objectness"])
        rpn_objectness = per_image_mean(objectness, sampled)
        targets = encode(tf.gather(gt, index, batch_dims=1), anchors, scales)
        rpn_box = per_image_mean(smooth_l1(y_pred["rpn_deltas"], targets), sampled * tf.cast(positive, "float32"))

        # Second stage: proposals (and the targets themselves) against the targets.
        boxes, valid = self.proposals(y_pred, int(f["proposals_train"]))
        if s["add_groundtruth"]:
            boxes = tf.concat([boxes, tf.where(gt_valid[..., None], gt, 0.0)], 1)
            valid = tf.concat([valid, gt_valid], 1)
        best, index, _ = match(boxes, valid, gt, gt_valid)
        positive = best >= float(s["positive_threshold"])
        negative = valid & ~positive
        chosen = balanced_sample(positive, negative, int(s["batch_size"]), float(s["positive_fraction"]))
        k = int(s["batch_size"])
        _, pick = tf.math.top_k(tf.cast(chosen, "float32") + tf.random.uniform(tf.shape(best)) * 0.5, k=k)
        weight = tf.cast(tf.gather(chosen, pick, batch_dims=1), "float32")
        boxes = tf.gather(boxes, pick, batch_dims=1)
        is_positive = tf.gather(positive, pick, batch_dims=1)
        matched = tf.gather(index, pick, batch_dims=1)
        classes = tf.cast(tf.gather(labels, matched, batch_dims=1), "int32")
        target_class = tf.where(is_positive, classes + 1, 0)  # 0: background
        logits, deltas = self.classify(y_pred["features"], boxes, training=training)
        class_loss = per_image_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(target_class, logits), weight)
        own = tf.gather(deltas, tf.maximum(classes, 0), batch_dims=2)  # [B, k, 4]: the matched class's deltas
        targets = encode(tf.gather(gt, matched, batch_dims=1), boxes, scales)
        box_loss = per_image_mean(smooth_l1(own, targets), weight * tf.cast(is_positive, "float32"))

        parts = (rpn_box, rpn_objectness, box_loss, class_loss)
        weights = (float(f["localization_weight"]), float(f["objectness_weight"]), float(s["localization_weight"]),
                   float(s["classification_weight"]) * self.class_loss_weight)
        for tracker, part in zip(self.trackers, parts):
            tracker.update_state(part)
        total = tf.add_n([w * p for w, p in zip(weights, parts)])
        for extra in self.losses:  # regularisers, if any
            total += tf.cast(extra, "float32")
        return scale_loss_for_distribution(total)

    class_loss_weight = 1.0  # train.class_loss_weight, set by the family's compile

    # ---- detection

    def detections(self, images, detection: dict[str, Any], max_detections: int):
        """Resized images [B, S, S, 3] in [0, 255] -> the TF OD API outputs (module doc)."""
        outputs = self(images, training=False)
        boxes, valid = self.proposals(outputs, int(self.first_stage["proposals_infer"]))
        logits, deltas = self.classify(outputs["features"], boxes)
        scores = tf.where(valid[..., None], tf.nn.softmax(logits)[..., 1:], -1.0)  # padded proposals: never kept
        decoded = tf.clip_by_value(decode(deltas, boxes[:, :, None, :], self.box_coder_scales), 0.0, 1.0)
        nms_boxes, nms_scores, nms_classes, count = tf.image.combined_non_max_suppression(
            decoded, scores, max_output_size_per_class=int(detection["max_detections_per_class"]),
            max_total_size=max_detections, iou_threshold=float(detection["iou_threshold"]),
            score_threshold=float(detection["score_threshold"]), pad_per_class=False, clip_boxes=True)
        keep = tf.sequence_mask(count, max_detections, dtype="float32")
        return {"detection_boxes": nms_boxes * keep[..., None],
                "detection_classes": (nms_classes + float(LABEL_OFFSET)) * keep,
                "detection_scores": nms_scores * keep,
                "num_detections": tf.cast(count, "float32")}


# ---------------------------------------------------------------------------- building


def _settings(m) -> dict[str, Any]:
    """The model file's sections FasterRCNN takes, as plain values."""
    plain = OmegaConf.to_container(m, resolve=True)
    return {"image_size": plain["image_size"], "anchors": plain["anchors"], "first_stage": plain["first_stage"],
            "second_stage": plain["second_stage"], "box_coder_scales": plain["box_coder_scales"],
            "freeze_batch_norm": plain["freeze_batch_norm"]}


def _from_preset(m, num_classes: int, preset: Path) -> Built:
    """The ResNet of a KerasHub preset folder: its weights (by layer name) and input scaling."""
    try:
        resnet = keras_hub.models.Backbone.from_preset(str(preset))
        converter = keras_hub.layers.ImageConverter.from_preset(str(preset))
    except Exception as exc:  # a broken or foreign preset: name the folder
        raise ModelError(f"{preset}: cannot load as a KerasHub ResNet preset: {exc}") from exc
    if not isinstance(resnet, keras_hub.models.ResNetBackbone) or len(resnet.stackwise_num_filters) <= FEATURE_STACKS:
        raise ModelError(f"{preset}: the faster_rcnn family needs a KerasHub ResNet of 4 stacks, "
                         f"got {type(resnet).__name__}")
    config = resnet.get_config()
    model = FAMILY.built(FasterRCNN(num_classes, backbone=config, scale=per_channel(converter.scale, 1.0),
                                    offset=per_channel(converter.offset, 0.0), **_settings(m)))
    by_name = {layer.name: layer for layer in resnet.layers}
    kept, new = 0, []
    for part in (model.features, model.box_head):
        for layer in part.layers:
            if layer.weights and layer.name in by_name:
                layer.set_weights(by_name[layer.name].get_weights())
                kept += len(layer.weights)
    for layer in (model.rpn_conv, model.rpn_objectness, model.rpn_box, model.class_logits, model.box_deltas):
        new += [w.path for w in layer.weights]
    return Built(model, kept=kept, total=len(model.weights), new=new)


class FasterRcnnFamily(KerasModelFamily):
    name = "faster_rcnn"
    config_file = "faster_rcnn.json"
    model_class = FasterRCNN

    def from_preset(self, m, num_classes: int, preset: Path) -> Built:
        return _from_preset(m, num_classes, preset)

    def from_architecture(self, m, num_classes: int, architecture: dict[str, Any]) -> FasterRCNN:
        a = architecture
        return FasterRCNN(num_classes, backbone=a["backbone"], scale=a["scale"], offset=a["offset"], **_settings(m))

    def training_targets(self, boxes, labels, size: int) -> dict[str, Any]:
        return {"boxes": boxes, "labels": labels}  # normalised yxyx; padding rows -1, masked by the loss

    def loss_parts(self, logs: dict[str, float]) -> dict[str, float]:
        nan = float("nan")
        get = lambda key: float(logs.get(key, nan))  # noqa: E731
        return {"loss": get("loss"), "box_loss": get("rpn_box_loss") + get("box_loss"),
                "class_loss": get("rpn_objectness_loss") + get("class_loss")}


FAMILY = FasterRcnnFamily()
