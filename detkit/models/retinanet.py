"""RetinaNet (KerasHub's ``RetinaNetObjectDetector``): the ``retinanet`` family (docs/models.md).

Building (``build``)
--------------------
``pretrained: none``
    Built from the model file's ``architecture`` (ResNet backbone, FPN levels, anchors, heads),
    randomly initialised (``conf/model/retinanet_tiny.yaml``).
a preset (``architecture: null``)
    The KerasHub RetinaNet preset folder the ``pretrained`` stage wrote into ``models/pretrained/``
    (e.g. ``retinanet_resnet50_fpn_coco``). Backbone, FPN, anchors, box head and the class head's
    conv layers keep their pretrained weights; the class head's last layer is new, sized for this
    dataset's classes (unless the preset already has that many).

Either way the model is a stock ``keras_hub.models.RetinaNetObjectDetector`` with
``bounding_box_format="yxyx"`` (absolute pixels of the model input), so a trained model
saved with ``save_to_preset`` loads with plain KerasHub. Two KerasHub quirks are handled
here: its RetinaNet puts the focal-loss prior bias on the *box* head instead of the class
head (``set_prior_bias`` fixes a freshly built model), and its ``RetinaNetLabelEncoder``
does not serialise the matcher settings (they are rebuilt from the model file for training).

Training targets are the normalised boxes in pixels of the model input, padding rows -1
(KerasHub's ignored marker); the model's image converter applies ``scale``/``offset`` to the
[0, 255] pixels, in ``fit`` (KerasHub maps its preprocessor over the data) and in ``detect``.

Detections (``detect``)
-----------------------
``DetectionDecoder`` decodes the anchor deltas, applies the sigmoid, keeps the
``pre_nms_top_k`` best anchors and runs per-class NMS (``tf.image.combined_non_max_suppression``),
for any batch size.

Trained model (``save`` / ``load``): a KerasHub preset folder (``config.json``, ``task.json``,
``preprocessor.json``, ``*.weights.h5``, ``metadata.json``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras_hub.src.models.retinanet.retinanet_label_encoder import RetinaNetLabelEncoder

from detkit.models.family import LABEL_OFFSET, Built, Family, ModelError, find_preset

BOX_FORMAT = "yxyx"  # absolute pixels of the model input, as KerasHub's "yxyx"


def make_label_encoder(anchor_generator, matching) -> Any:
    return RetinaNetLabelEncoder(
        anchor_generator=anchor_generator,
        bounding_box_format=BOX_FORMAT,
        encoding_format="center_xywh",  # what KerasHub's RetinaNet decodes with
        positive_threshold=float(matching.positive_threshold),
        negative_threshold=float(matching.negative_threshold),
        box_matcher_force_match_for_each_col=bool(matching.force_match),
    )


HEAD_INIT_STDDEV = 0.01  # the RetinaNet paper's head init; KerasHub's heads default to random_normal, std 0.05


def init_head_kernels(layers) -> None:
    """Gaussian kernels, std ``HEAD_INIT_STDDEV``, for new head convs (seeded by keras.utils.set_random_seed).

    With KerasHub's std 0.05 the class logits of a new head start far from the focal-loss
    prior, and the first steps' class loss is in the tens of thousands instead of about 1.
    """
    init = keras.initializers.RandomNormal(stddev=HEAD_INIT_STDDEV)
    for layer in layers:
        layer.kernel.assign(init(layer.kernel.shape, dtype=layer.kernel.dtype))


def freeze_unused_fpn_norms(backbone) -> list[str]:
    """Mark the FPN's never-used output batch norms non-trainable; return their names.

    KerasHub's FeaturePyramid builds an output norm for every level but applies it only to
    the levels it adds above the image encoder's last one, so the others get no gradient
    (and the optimizer warns about it every run). Their weights stay in the files, so a
    saved model still loads with plain KerasHub.
    """
    fpn = backbone.feature_pyramid
    encoder_top = min(max(int(level[1]) for level in backbone.image_encoder.pyramid_outputs), fpn.max_level)
    unused = [layer for level, layer in getattr(fpn, "output_batch_norms", {}).items() if int(level[1:]) <= encoder_top]
    for layer in unused:
        layer.trainable = False
    return [layer.name for layer in unused]


def freeze_batch_norms(image_encoder) -> int:
    """Keep the image encoder's batch norms at their (pretrained) statistics; return how many.

    In Keras 3 a non-trainable BatchNormalization runs in inference mode, also in ``fit``: with
    a handful of images per step the batch statistics are noise, and with them the features
    the new heads learn from.
    """
    norms = [layer for layer in image_encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.trainable = False
    return len(norms)


def set_prior_bias(detector, prior_probability: float, reset_box_bias: bool = True) -> None:
    """Focal-loss prior on the class head, zero bias on the box head (KerasHub swaps them)."""
    cls = detector.classification_head.prediction_layer
    cls.bias.assign(np.full(cls.bias.shape, -math.log((1 - prior_probability) / prior_probability), "float32"))
    if reset_box_bias:
        box = detector.box_head.prediction_layer
        box.bias.assign(np.zeros(box.bias.shape, "float32"))


def _converter(scale, offset):
    # image_size=None: resizing is detkit.data.pipeline.resize_image's job (stretch, see module doc),
    # the converter only scales.
    return keras_hub.layers.RetinaNetImageConverter(
        image_size=None, scale=[float(v) for v in scale], offset=[float(v) for v in offset]
    )


def _build_retinanet(m, num_classes: int):
    size, a = int(m.image_size), m.architecture
    b = a.backbone
    image_encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=list(b.input_conv_filters),
        input_conv_kernel_sizes=list(b.input_conv_kernel_sizes),
        stackwise_num_filters=list(b.stackwise_num_filters),
        stackwise_num_blocks=list(b.stackwise_num_blocks),
        stackwise_num_strides=list(b.stackwise_num_strides),
        block_type=b.block_type,
        use_pre_activation=bool(b.use_pre_activation),
        image_shape=(size, size, 3),
    )
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=image_encoder,
        min_level=int(a.min_level),
        max_level=int(a.max_level),
        use_p5=bool(a.use_p5),
        use_fpn_batch_norm=bool(a.use_fpn_batch_norm),
        image_shape=(size, size, 3),
    )
    anchor_generator = keras_hub.layers.AnchorGenerator(
        bounding_box_format=BOX_FORMAT,
        min_level=int(a.min_level),
        max_level=int(a.max_level),
        num_scales=int(a.anchors.num_scales),
        aspect_ratios=[float(a) for a in a.anchors.aspect_ratios],
        anchor_size=float(a.anchors.anchor_size),
    )
    preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=_converter(a.scale, a.offset))
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=num_classes,
        bounding_box_format=BOX_FORMAT,
        anchor_generator=anchor_generator,
        label_encoder=make_label_encoder(anchor_generator, m.matching),
        use_prediction_head_norm=bool(a.head.use_group_norm),
        classification_head_prior_probability=float(m.prior_probability),
        pre_logits_num_conv_layers=int(a.head.num_conv_layers),
        preprocessor=preprocessor,
    )
    heads = (detector.box_head, detector.classification_head)
    init_head_kernels([layer for head in heads for layer in (*head.conv_layers, head.prediction_layer)])
    set_prior_bias(detector, float(m.prior_probability))
    freeze_unused_fpn_norms(backbone)
    return detector


def _build_from_preset(m, num_classes: int, preset: Path):
    try:
        base = keras_hub.models.RetinaNetObjectDetector.from_preset(str(preset))
    except Exception as exc:  # a broken or foreign preset: name the folder
        raise ModelError(f"{preset}: cannot load as a KerasHub RetinaNet preset: {exc}") from exc
    converter = getattr(base.preprocessor, "image_converter", None)
    if converter is None:
        raise ModelError(f"{preset}: the preset has no image converter, so its input scaling is unknown")
    preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(
        image_converter=_converter(converter.scale if converter.scale is not None else [1.0],
                                   converter.offset if converter.offset is not None else [0.0]))
    backbone = base.backbone
    size = int(m.image_size)
    if tuple(backbone.image_shape) != (size, size, 3):
        # Anchors need a static input size: the same backbone (and weights) at image_size.
        config = backbone.get_config()
        config["image_shape"] = (size, size, 3)
        encoder = config.get("image_encoder", {}).get("config", {})
        if "image_shape" in encoder:
            encoder["image_shape"] = (size, size, 3)
        backbone = type(backbone).from_config(config)
        backbone.set_weights(base.backbone.get_weights())
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=num_classes,
        bounding_box_format=BOX_FORMAT,
        anchor_generator=base.anchor_generator,
        label_encoder=make_label_encoder(base.anchor_generator, m.matching),
        use_prediction_head_norm=base.use_prediction_head_norm,
        classification_head_prior_probability=float(m.prior_probability),
        pre_logits_num_conv_layers=base.pre_logits_num_conv_layers,
        preprocessor=preprocessor,
        activation=base.activation,
    )
    # Everything but the class logits keeps the pretrained weights.
    detector.box_head.set_weights(base.box_head.get_weights())
    kept = len(backbone.weights) + len(detector.box_head.weights)
    new_head, old_head = detector.classification_head, base.classification_head
    pairs = zip(new_head.conv_layers + new_head.group_norm_layers, old_head.conv_layers + old_head.group_norm_layers)
    for new, old in pairs:
        new.set_weights(old.get_weights())
        kept += len(new.weights)
    fresh = []
    if base.num_classes == num_classes:
        new_head.prediction_layer.set_weights(old_head.prediction_layer.get_weights())
        kept += len(new_head.prediction_layer.weights)
    else:
        init_head_kernels([new_head.prediction_layer])
        set_prior_bias(detector, float(m.prior_probability), reset_box_bias=False)
        fresh = [w.path for w in new_head.prediction_layer.weights]
    freeze_unused_fpn_norms(backbone)
    return detector, kept, fresh


def input_size(detector) -> int:
    """The square model input size (the backbone's static image shape)."""
    shape = detector.backbone.image_shape
    if shape[0] is None:
        raise ModelError("the detector has no static input size; build it with model.image_size")
    return int(shape[0])


# ---------------------------------------------------------------------------- detecting


def preprocess(detector, images):
    """``images`` float32 [B, S, S, 3] in [0, 255] (``detkit.data.pipeline.resize_image``) -> model input."""
    images = tf.cast(images, "float32")
    converter = getattr(detector.preprocessor, "image_converter", None)
    return converter(images) if converter is not None else images


def anchors_for(detector, size: int):
    """All anchors, concatenated over levels as the heads' outputs are, yxyx pixels [N, 4]."""
    dummy = tf.zeros((1, size, size, 3))
    anchors = detector.anchor_generator(dummy)
    anchors = tf.concat([anchors[f"P{level}"] for level in range(detector.anchor_generator.min_level,
                                                                  detector.anchor_generator.max_level + 1)], axis=0)
    return keras.utils.bounding_boxes.convert_format(
        anchors, source=detector.anchor_generator.bounding_box_format, target="yxyx", height=size, width=size)


@keras.saving.register_keras_serializable(package="detkit")
class DetectionDecoder(keras.layers.Layer):
    """Raw RetinaNet outputs -> TF OD API detections (see the module doc), any batch size.

    Args:
        image_size: int. Side of the square model input in pixels (anchors and decoded boxes
            are in its pixels; output boxes are divided by it).
        max_detections: int. Detections kept per image, after NMS.
        max_detections_per_class: int. Detections kept per class and image by NMS.
        score_threshold: float. Minimum class score kept.
        iou_threshold: float. NMS overlap above which the lower-scored box of a class goes.
        pre_nms_top_k: int. Anchors (ranked by their best class score) that enter NMS.
        label_offset: int. Added to the 0-based model class (1: TF OD API label-map ids).
        box_variance: list of 4 floats. The label encoder's box delta scaling.
        from_logits: bool. Apply a sigmoid to the class outputs.

    Call arguments: ``box_deltas`` [B, N, 4] (center_xywh deltas, as KerasHub encodes),
    ``cls_logits`` [B, N, C], ``anchors`` [N, 4] yxyx pixels (``anchors_for``).
    """

    def __init__(self, image_size, max_detections=100, max_detections_per_class=100, score_threshold=0.05,
                 iou_threshold=0.5, pre_nms_top_k=1000, label_offset=LABEL_OFFSET,
                 box_variance=(1.0, 1.0, 1.0, 1.0), from_logits=True, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.max_detections = max_detections
        self.max_detections_per_class = max_detections_per_class
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.pre_nms_top_k = pre_nms_top_k
        self.label_offset = label_offset
        self.box_variance = box_variance
        self.from_logits = from_logits

    def call(self, box_deltas, cls_logits, anchors):
        scores = tf.cast(cls_logits, "float32")
        if self.from_logits:
            scores = tf.sigmoid(scores)
        boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors=tf.cast(anchors, "float32"), boxes_delta=tf.cast(box_deltas, "float32"),
            anchor_format="yxyx", box_format="yxyx", encoded_format="center_xywh",
            variance=[float(v) for v in self.box_variance], image_shape=(self.image_size, self.image_size, 3))
        boxes = tf.clip_by_value(boxes / float(self.image_size), 0.0, 1.0)
        # Per-class NMS over the best anchors only: its cost grows with anchors x classes.
        k = tf.minimum(int(self.pre_nms_top_k), tf.shape(scores)[1])
        _, top = tf.math.top_k(tf.reduce_max(scores, axis=-1), k=k)
        boxes = tf.gather(boxes, top, batch_dims=1)
        scores = tf.gather(scores, top, batch_dims=1)
        nms_boxes, nms_scores, nms_classes, valid = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], scores,
            max_output_size_per_class=int(self.max_detections_per_class),
            max_total_size=int(self.max_detections),
            iou_threshold=float(self.iou_threshold),
            score_threshold=float(self.score_threshold),
            pad_per_class=False,
            clip_boxes=True,
        )
        keep = tf.sequence_mask(valid, int(self.max_detections), dtype="float32")
        return {
            "detection_boxes": nms_boxes * keep[..., None],
            "detection_classes": (nms_classes + float(self.label_offset)) * keep,
            "detection_scores": nms_scores * keep,
            "num_detections": tf.cast(valid, "float32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update({
            "image_size": self.image_size,
            "max_detections": self.max_detections,
            "max_detections_per_class": self.max_detections_per_class,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "pre_nms_top_k": self.pre_nms_top_k,
            "label_offset": self.label_offset,
            "box_variance": self.box_variance,
            "from_logits": self.from_logits,
        })
        return config


def make_decoder(detector, detection: Any = None, **overrides) -> DetectionDecoder:
    """A ``DetectionDecoder`` for ``detector``; ``detection`` is the model file's ``detection`` section."""
    settings = dict(detection) if detection is not None else {}
    settings.update(overrides)
    return DetectionDecoder(
        image_size=input_size(detector),
        box_variance=[float(v) for v in detector.label_encoder.box_variance],
        from_logits=keras.activations.get(detector.activation) != keras.activations.sigmoid,
        **settings,
    )


def detect(detector, images, decoder=None, anchors=None):
    """Detections (TF OD API dict, see the module doc) for resized images [B, S, S, 3] in [0, 255].

    ``anchors``: ``anchors_for(detector, size)``, computed here unless the caller keeps them.
    """
    decoder = decoder or make_decoder(detector)
    anchors = anchors_for(detector, input_size(detector)) if anchors is None else anchors
    outputs = detector(preprocess(detector, images), training=False)
    return decoder(outputs["bbox_regression"], outputs["cls_logits"], anchors)


class RetinaNet(Family):
    name = "retinanet"

    def build(self, m, num_classes: int, pretrained: Path | None) -> Built:
        if pretrained is None:
            if m.architecture is None:
                raise ModelError(f"conf/model/{m.name}.yaml: 'pretrained: none' builds from 'architecture', "
                                 "which is null; set the architecture keys or a preset in 'pretrained'")
            detector, kept, new = _build_retinanet(m, num_classes), 0, []
        else:
            detector, kept, new = _build_from_preset(m, num_classes, find_preset(pretrained))
        if m.freeze_batch_norm:
            freeze_batch_norms(detector.backbone.image_encoder)
        return Built(detector, kept=kept, total=len(detector.weights), new=new)

    def training_targets(self, boxes, labels, size: int) -> dict[str, Any]:
        # Pixels of the model input; padding rows stay -1, which the label encoder ignores.
        pixels = tf.where(labels[:, None] >= 0, boxes * float(size), -1.0)
        return {"boxes": pixels, "labels": labels}

    def compile(self, model, optimizer, t, jit_compile) -> None:
        model.compile(optimizer=optimizer, jit_compile=jit_compile,
                      loss_weights={"bbox_regression": 1.0, "cls_logits": float(t.class_loss_weight)})

    def loss_parts(self, logs: dict[str, float]) -> dict[str, float]:
        nan = float("nan")
        return {"loss": float(logs.get("loss", nan)), "box_loss": float(logs.get("bbox_regression_loss", nan)),
                "class_loss": float(logs.get("cls_logits_loss", nan))}

    def detect(self, model, images, detection: dict[str, Any], max_detections: int | None = None) -> dict[str, Any]:
        overrides = {"max_detections": max_detections} if max_detections else {}
        return detect(model, images, make_decoder(model, detection, **overrides))

    def save(self, model, folder: Path) -> None:
        model.save_to_preset(str(folder))

    def load(self, folder: Path):
        return keras_hub.models.RetinaNetObjectDetector.from_preset(str(folder))


FAMILY = RetinaNet()
