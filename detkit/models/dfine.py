"""D-FINE: the ``dfine`` family (docs/models.md), KerasHub's ``DFineBackbone`` (HGNetV2, hybrid
encoder, a DETR decoder refining fine-grained box distributions) with our own loss orchestration
and decoding.

Why not KerasHub's ``DFineObjectDetector`` as it is (keras-hub 0.32):

- with another class count its constructor rebuilds the backbone from its config, dropping every
  pretrained tensor without a word; here the backbone is built for the dataset's classes and every
  preset tensor whose shape does not depend on the class count is copied in by its path;
- its loss takes each image's matched targets from the batch's *first* image (the matcher's
  indices are per image, the loss terms index the whole batch's targets with them), counts padded
  rows as objects and reads boxes as normalised ``center_xywh``; ``compute_loss`` here drops the
  padded rows, gives the matcher each image's own count, turns its indices into batch indices,
  and normalises by the real number of boxes; ``training_targets`` gives ``center_xywh``;
- its Hungarian matcher (a pure-graph Munkres) does not find the cheapest assignment: on a random
  batch every image's total matching cost was higher than scipy's optimum (a one-box image was
  matched to query 0 at cost 6.99 where another query cost 2.81), and its loops over queries squared
  were most of a training step on CPU; ``hungarian_match`` here computes D-FINE's costs in the graph
  and solves each image with scipy's ``linear_sum_assignment``, as D-FINE's own matcher does;
- its contrastive denoising takes its ground truth once, when the backbone is built, not from each
  batch, so it is off here (``num_denoising: 0``): the paper trains with it;
- HGNetV2 writes its depthwise convolutions as Keras ``Conv2D`` layers with ``groups`` = channels, and
  Keras' TensorFlow backend runs every grouped convolution as an XLA function of its own (TensorFlow's
  grouped kernel is broken on CPU); ``NativeDepthwiseConv2D`` runs them with TensorFlow's depthwise
  kernel on the same weights, same numbers: a ``dfine_tiny`` training step (batch 16, one kernel thread)
  took 0.26 s instead of 0.50 s, and the export holds no XLA call;
- its ``predict`` runs NMS at a 0.5 confidence and needs a static batch size; D-FINE's own
  decoding (``detections``) is a top-k over every query and class, no NMS (the decoder's
  one-to-one matching makes duplicates rare), for any batch size.

Loss (``compute_loss``, inside Keras' ``fit``): the matching above and KerasHub's loss terms (varifocal,
L1, CIoU, fine-grained localisation, decoupled distillation) on the last decoder layer, each earlier
layer (distilled from the last) and the encoder's proposals, as D-FINE's criterion (KerasHub's counts the
last layer twice), weighted by ``loss_weights``; the train log's
``class_loss`` is the varifocal terms, ``box_loss`` the rest.

Starting weights: ``pretrained: none`` builds ``architecture`` at random; a preset folder (the
``pretrained`` stage's copy of a KerasHub D-FINE preset) gives its architecture, its input scaling
and every tensor whose shape fits. Trained model (``save`` / ``load``): ``dfine.json`` (the model's
config) and ``model.weights.h5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras.src.losses.loss import scale_loss_for_distribution
from keras_hub.src.models.d_fine.d_fine_loss import compute_box_losses, compute_local_losses
from omegaconf import OmegaConf
from scipy.optimize import linear_sum_assignment

from detkit.models.family import LABEL_OFFSET, Built, KerasModelFamily, ModelError, per_channel

CLASS_TERMS = ("vfl",)  # the rest of LOSS_TERMS are box terms
LOSS_TERMS = ("vfl", "bbox", "ciou", "fgl", "ddf")
# Keys of KerasHub's DFineBackbone that the model file does not set: the class count is the
# dataset's, the input is any square, denoising is off (module doc).
FIXED_KEYS = ("backbone", "num_labels", "num_denoising", "labels", "image_shape", "data_format", "seed",
              "anchor_image_size", "name", "trainable", "dtype")


def to_center_xywh(boxes):
    """Normalised [ymin, xmin, ymax, xmax] -> normalised [center_x, center_y, width, height]."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return tf.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)


def pairwise_matched_iou(a, b):
    """IoU of each box in ``a`` with the box at the same place in ``b``, both normalised center_xywh."""
    a, b = to_yxyx(a), to_yxyx(b)
    inter = tf.maximum(tf.minimum(a[..., 2:], b[..., 2:]) - tf.maximum(a[..., :2], b[..., :2]), 0.0)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    overlap = inter[..., 0] * inter[..., 1]
    return overlap / tf.maximum(area(a) + area(b) - overlap, 1e-9)


def varifocal_loss(output, targets, indices, num_boxes, num_classes: int, alpha: float, gamma: float):
    """D-FINE's varifocal class loss. KerasHub's writes each image's targets into a [B, Q] grid with one
    scatter in which every unmatched slot points at image 0's query 0, so a match there is erased as
    background; here the grid is built by one-hot products, where unmatched slots add nothing."""
    rows, cols, ok = indices  # [B, M]: query, batch target row, whether it is a match
    logits = output["logits"]
    queries = tf.shape(logits)[1]
    matched = tf.one_hot(rows, queries) * tf.cast(ok, "float32")[..., None]  # [B, M, Q]
    labels = tf.one_hot(tf.gather(targets["labels"], cols), num_classes)  # [B, M, C]; an invalid row: any class
    iou = pairwise_matched_iou(tf.stop_gradient(tf.gather(output["pred_boxes"], rows, batch_dims=1)),
                               tf.gather(targets["boxes"], cols))
    is_target = tf.einsum("bmq,bmc->bqc", matched, labels)
    target_score = tf.einsum("bmq,bmc->bqc", matched * iou[..., None], labels)
    weight = alpha * tf.sigmoid(tf.stop_gradient(logits)) ** gamma * (1 - is_target) + target_score
    loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=target_score, logits=logits) * weight
    return {"loss_vfl": tf.reduce_sum(tf.reduce_mean(loss, axis=1)) * tf.cast(queries, "float32") / num_boxes}


def _assign(cost, valid):
    """Each image's optimal one-to-one assignment of queries to its valid targets (scipy's solver, as
    D-FINE's own matcher): [B, Q] query, target (its rank among the image's valid ones), is a match."""
    rows, cols = (np.zeros(cost.shape[:2], np.int32) for _ in range(2))
    ok = np.zeros(cost.shape[:2], bool)
    for b in range(cost.shape[0]):
        query, target = linear_sum_assignment(cost[b][:, valid[b]])
        rows[b, :len(query)], cols[b, :len(query)], ok[b, :len(query)] = query, target, True
    return rows, cols, ok


def hungarian_match(output, labels, boxes, valid, m: dict[str, float]):
    """D-FINE's matching of queries to each image's targets (``labels`` [B, T] and ``boxes`` [B, T, 4],
    padded rows not ``valid``): focal class cost, L1 and complete-IoU box costs. The costs are one
    batched graph; the assignment is scipy's, on the host (KerasHub's pure-graph Hungarian loops over
    queries squared per image and was most of a training step's time on CPU)."""
    p = tf.sigmoid(tf.stop_gradient(output["logits"]))  # [B, Q, C]
    p = tf.gather(p, tf.maximum(tf.cast(labels, "int32"), 0), axis=2, batch_dims=1)  # [B, Q, T]
    alpha, gamma = m["alpha"], m["gamma"]
    class_cost = (alpha * (1 - p) ** gamma * -tf.math.log(p + 1e-8)
                  - (1 - alpha) * p ** gamma * -tf.math.log(1 - p + 1e-8))
    predicted = tf.stop_gradient(output["pred_boxes"])[:, :, None]  # [B, Q, 1, 4]
    bbox_cost = tf.reduce_sum(tf.abs(predicted - boxes[:, None]), axis=-1)
    ciou_cost = -keras.utils.bounding_boxes.compute_ciou(to_xyxy(predicted), to_xyxy(boxes[:, None]), "xyxy")
    cost = m["bbox_cost"] * bbox_cost + m["class_cost"] * class_cost + m["ciou_cost"] * ciou_cost
    rows, cols, ok = tf.numpy_function(_assign, [cost, valid], [tf.int32, tf.int32, tf.bool], stateful=False)
    shape = tf.shape(output["logits"])[:2]
    return tf.reshape(rows, shape), tf.reshape(cols, shape), tf.reshape(ok, shape)


def to_xyxy(boxes):
    """Normalised [center_x, center_y, width, height] -> normalised [xmin, ymin, xmax, ymax]."""
    cx, cy, w, h = tf.unstack(boxes, axis=-1)
    return tf.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def to_yxyx(boxes):
    """Normalised [center_x, center_y, width, height] -> normalised [ymin, xmin, ymax, xmax]."""
    cx, cy, w, h = tf.unstack(boxes, axis=-1)
    return tf.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


class NativeDepthwiseConv2D(keras.layers.Conv2D):
    """A grouped ``Conv2D`` with one input channel per group (a depthwise convolution), run by
    TensorFlow's depthwise kernel instead of Keras' XLA function (module doc). Same weights, same
    variable paths: the kernel ``[h, w, 1, channels x multiplier]`` read as ``[h, w, channels, multiplier]``
    is the depthwise filter, output channel for output channel."""

    @classmethod
    def adopt(cls, model: keras.Model) -> int:
        """Turns every depthwise ``Conv2D`` of ``model`` (channels last, no dilation) into this class; how many."""
        adopted = 0
        for layer in model._flatten_layers():
            if (type(layer) is keras.layers.Conv2D and layer.groups > 1 and layer.kernel.shape[2] == 1
                    and layer.data_format == "channels_last" and tuple(layer.dilation_rate) == (1, 1)):
                layer.__class__ = cls
                adopted += 1
        return adopted

    def convolution_op(self, inputs, kernel):
        height, width, _, channels = kernel.shape
        depthwise = tf.reshape(kernel, (height, width, self.groups, channels // self.groups))
        return tf.nn.depthwise_conv2d(inputs, depthwise, strides=(1, *self.strides, 1), padding=self.padding.upper())


class DFine(keras.Model):
    """D-FINE on a ``DFineBackbone`` built from ``backbone_config`` (its ``backbone`` key: an
    ``HGNetV2Backbone`` config) for ``num_classes`` classes; ``call`` gives the decoder's outputs."""

    def __init__(self, num_classes, image_size, backbone_config, scale, offset, matcher, loss_weights,
                 ddf_temperature, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.image_size = int(num_classes), int(image_size)
        self.backbone_config = {k: v for k, v in backbone_config.items() if k not in FIXED_KEYS or k == "backbone"}
        self.scale, self.offset = [float(v) for v in scale], [float(v) for v in offset]
        self.matcher, self.loss_weights = dict(matcher), dict(loss_weights)
        self.ddf_temperature = float(ddf_temperature)
        hgnet = keras.saving.deserialize_keras_object(self.backbone_config["backbone"])
        self.backbone = keras_hub.models.DFineBackbone(
            **{**self.backbone_config, "backbone": hgnet}, num_labels=self.num_classes, num_denoising=0,
            anchor_image_size=(self.image_size, self.image_size), image_shape=(None, None, 3),
            dtype=self.dtype_policy, name="d_fine_backbone")
        NativeDepthwiseConv2D.adopt(self.backbone)
        self.trackers = [keras.metrics.Mean(name=f"{part}_loss") for part in ("class", "box")]

    def build(self, input_shape):
        """Nothing to create: the functional backbone made every weight in ``__init__``."""

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "image_size": self.image_size,
                "backbone_config": self.backbone_config, "scale": self.scale, "offset": self.offset,
                "matcher": self.matcher, "loss_weights": self.loss_weights, "ddf_temperature": self.ddf_temperature}

    def call(self, images, training=False):
        x = tf.cast(images, "float32") * tf.constant(self.scale) + tf.constant(self.offset)
        outputs = self.backbone(x, training=training)
        keep = ("intermediate_logits", "intermediate_reference_points", "intermediate_predicted_corners",
                "initial_reference_points", "enc_topk_logits", "enc_topk_bboxes")
        return {k: tf.cast(outputs[k], "float32") for k in keep}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        labels, boxes = tf.cast(y["labels"], "float32"), tf.cast(y["boxes"], "float32")
        valid = labels >= 0
        counts = tf.reduce_sum(tf.cast(valid, "int32"), axis=1)
        targets = [{"labels": tf.cast(tf.boolean_mask(labels, valid), "int32"), "boxes": tf.boolean_mask(boxes, valid)}]
        first_row = tf.cumsum(counts, exclusive=True)  # each image's first row among the batch's targets
        last_row = tf.maximum(tf.reduce_sum(counts) - 1, 0)
        num_boxes = tf.maximum(tf.cast(tf.reduce_sum(counts), "float32"), 1.0)
        m = self.matcher

        def matched(output):
            rows, cols, ok = hungarian_match(output, labels, boxes, valid, m)
            return rows, tf.minimum(cols + first_row[:, None], last_row), ok

        terms: dict[str, Any] = {}

        def add(output, local: bool, ddf: bool = False):
            indices = matched(output)
            found = {**varifocal_loss(output, targets[0], indices, num_boxes, self.num_classes, m["alpha"], m["gamma"]),
                     **compute_box_losses(output, targets, indices, num_boxes)}
            if local:
                found.update(compute_local_losses(output, targets, indices, num_boxes, self.backbone,
                                                  self.ddf_temperature, compute_ddf=ddf))
            for key, value in found.items():
                terms.setdefault(key.removeprefix("loss_"), []).append(value)

        logits, points = y_pred["intermediate_logits"], y_pred["intermediate_reference_points"]
        corners, initial = y_pred["intermediate_predicted_corners"], y_pred["initial_reference_points"]
        layers = self.backbone.num_decoder_layers
        last = {"logits": logits[:, -1], "pred_boxes": tf.clip_by_value(points[:, -1], 0.0, 1.0)}
        add({**last, "pred_corners": corners[:, -1], "ref_points": initial[:, -1],
             "teacher_corners": tf.zeros_like(corners[:, -1]), "teacher_logits": tf.zeros_like(logits[:, -1])},
            local=True)
        for i in range(layers - 1):  # the earlier layers, distilled from the last (D-FINE's auxiliary outputs)
            add({"logits": logits[:, i], "pred_boxes": tf.clip_by_value(points[:, i], 0.0, 1.0),
                 "pred_corners": corners[:, i], "ref_points": initial[:, i],
                 "teacher_corners": corners[:, -1], "teacher_logits": logits[:, -1]}, local=True, ddf=True)
        add({"logits": y_pred["enc_topk_logits"], "pred_boxes": tf.clip_by_value(y_pred["enc_topk_bboxes"], 0.0, 1.0)},
            local=False)

        weighted = {k: float(self.loss_weights[k]) * tf.add_n(v) for k, v in terms.items()}
        class_loss = tf.add_n([weighted[k] for k in CLASS_TERMS]) * self.class_loss_weight
        box_loss = tf.add_n([v for k, v in weighted.items() if k not in CLASS_TERMS])
        for tracker, part in zip(self.trackers, (class_loss, box_loss)):
            tracker.update_state(part)
        total = class_loss + box_loss
        for extra in self.losses:  # regularisers, if any
            total += tf.cast(extra, "float32")
        return scale_loss_for_distribution(total)

    class_loss_weight = 1.0  # train.class_loss_weight, set by the family's compile

    def detections(self, images, detection: dict[str, Any], max_detections: int):
        """Resized images [B, S, S, 3] in [0, 255] -> the TF OD API outputs: the ``max_detections``
        best (query, class) pairs by sigmoid score, those under ``score_threshold`` dropped."""
        outputs = self(images, training=False)
        scores = tf.sigmoid(outputs["intermediate_logits"][:, -1])  # [B, Q, C]
        boxes = tf.clip_by_value(to_yxyx(outputs["intermediate_reference_points"][:, -1]), 0.0, 1.0)
        queries, classes = scores.shape[1], scores.shape[2]
        k = min(max_detections, queries * classes)
        top, index = tf.math.top_k(tf.reshape(scores, [-1, queries * classes]), k=k)
        picked = tf.gather(boxes, index // classes, batch_dims=1)
        count = tf.reduce_sum(tf.cast(top >= float(detection["score_threshold"]), "int32"), axis=1)
        pad = [[0, 0], [0, max_detections - k]]
        keep = tf.sequence_mask(count, max_detections, dtype="float32")
        return {"detection_boxes": tf.pad(picked, [*pad, [0, 0]]) * keep[..., None],
                "detection_classes": tf.pad(tf.cast(index % classes, "float32") + float(LABEL_OFFSET), pad) * keep,
                "detection_scores": tf.pad(top, pad) * keep,
                "num_detections": tf.cast(count, "float32")}


# ---------------------------------------------------------------------------- building


def model_settings(m) -> dict[str, Any]:
    """The model file's keys that ``DFine`` takes besides its backbone and input scaling."""
    plain = OmegaConf.to_container(m, resolve=True)
    return {"image_size": plain["image_size"], "matcher": plain["matcher"], "loss_weights": plain["loss_weights"],
            "ddf_temperature": plain["ddf_temperature"]}


def _from_preset(m, num_classes: int, preset: Path) -> Built:
    """The preset's architecture for ``num_classes``, every tensor of it whose shape fits, its input scaling."""
    try:
        pretrained = keras_hub.models.Backbone.from_preset(str(preset))
        # D-FINE reads pixels in [0, 1]; a preset saved without its preprocessor says nothing else.
        converter = (keras_hub.layers.ImageConverter.from_preset(str(preset))
                     if (preset / "image_converter.json").is_file() else None)
    except Exception as exc:  # a broken or foreign preset: name the folder
        raise ModelError(f"{preset}: cannot load as a KerasHub D-FINE preset: {exc}") from exc
    if not isinstance(pretrained, keras_hub.models.DFineBackbone):
        raise ModelError(f"{preset}: the dfine family needs a KerasHub D-FINE preset, got {type(pretrained).__name__}")
    config = pretrained.get_config()
    config["backbone"] = keras.saving.serialize_keras_object(pretrained.backbone)
    scale, offset = getattr(converter, "scale", None), getattr(converter, "offset", None)
    model = FAMILY.built(DFine(num_classes, backbone_config=config, scale=per_channel(scale, 1 / 255),
                               offset=per_channel(offset, 0.0), **model_settings(m)))
    source = {w.path: w for w in pretrained.weights}
    kept, new = 0, []
    for weight in model.backbone.weights:
        old = source.get(weight.path)
        if old is not None and tuple(old.shape) == tuple(weight.shape):
            weight.assign(old)
            kept += 1
        else:
            new.append(weight.path)
    return Built(model, kept=kept, total=len(model.weights), new=new)


def backbone_config(architecture: dict[str, Any]) -> dict[str, Any]:
    """The model file's ``architecture`` as DFineBackbone keys (its ``backbone``: an HGNetV2 config)."""
    hgnet = dict(architecture["backbone"], image_shape=(None, None, 3))
    return {**architecture["decoder"],
            "backbone": keras.saving.serialize_keras_object(keras_hub.models.HGNetV2Backbone(**hgnet))}


class DFineFamily(KerasModelFamily):
    name = "dfine"
    config_file = "dfine.json"
    model_class = DFine
    # KerasHub's D-FINE makes its position embeddings and anchors with ops.arange in the layers'
    # compute dtype, and TensorFlow's Range op takes no float16: under mixed_float16 the train step
    # cannot be built (on GPUs as on CPUs), so D-FINE trains in float32.
    mixed_float16 = False

    def built(self, model: DFine) -> DFine:
        # Every weight exists once DFine.__init__ returns, so marking the model built traces nothing;
        # the blank-image call of the base class traced the whole forward pass (6 s a D-FINE tiny at
        # one thread, paid by every process that builds or loads one).
        model.build((None, model.image_size, model.image_size, 3))
        return model

    def from_preset(self, m, num_classes: int, preset: Path) -> Built:
        return _from_preset(m, num_classes, preset)

    def from_architecture(self, m, num_classes: int, architecture: dict[str, Any]) -> DFine:
        a = architecture
        return DFine(num_classes, backbone_config=backbone_config(a), scale=a["scale"], offset=a["offset"],
                     **model_settings(m))

    def training_targets(self, boxes, labels, size: int) -> dict[str, Any]:
        # D-FINE's loss reads normalised center_xywh; padding rows (label -1) are dropped by compute_loss.
        return {"boxes": tf.where(labels[:, None] >= 0, to_center_xywh(boxes), 0.0), "labels": labels}

    def loss_parts(self, logs: dict[str, float]) -> dict[str, float]:
        nan = float("nan")
        return {"loss": float(logs.get("loss", nan)), "box_loss": float(logs.get("box_loss", nan)),
                "class_loss": float(logs.get("class_loss", nan))}


FAMILY = DFineFamily()
