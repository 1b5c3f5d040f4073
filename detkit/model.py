"""The detector: build it from ``conf/model/<name>.yaml``, load it, and turn its raw outputs
into TF OD API detections.

Builders (``model.builder``)
----------------------------
``retinanet``
    A KerasHub RetinaNet built from the architecture keys of the model file (ResNet
    backbone, FPN levels, anchors, head), randomly initialised (``pretrained: none``).
``preset``
    A KerasHub RetinaNet preset folder written by the ``pretrained`` stage into
    ``models/pretrained/`` (e.g. ``retinanet_resnet50_fpn_coco``). Backbone, FPN, anchors,
    box head and the class head's conv layers keep their pretrained weights; the class
    head's last layer is new, sized for this dataset's classes.

Either way the model is a stock ``keras_hub.models.RetinaNetObjectDetector`` with
``bounding_box_format="yxyx"`` (absolute pixels of the model input), so a trained model
saved with ``save_to_preset`` loads with plain KerasHub. Two KerasHub quirks are handled
here: its RetinaNet puts the focal-loss prior bias on the *box* head instead of the class
head (``set_prior_bias`` fixes a freshly built model), and its ``RetinaNetLabelEncoder``
does not serialise the matcher settings (they are rebuilt from the model file for training).

Inputs
------
Images are stretched (aspect ratio not kept, no padding) to ``image_size`` x
``image_size``: normalised box coordinates are the same in the original and the model
image, so detections map back to the original image without bookkeeping. The resize is
``detkit.data.resize_image``, used by training, eval and export alike; pixel values stay in
[0, 255] and the model's image converter (``preprocess``) applies its scale/offset.

Labels
------
KerasHub classes are 0-based; label-map ids (TF OD API, ``label_map.pbtxt``) are 1-based:
class ``k`` of the model is id ``k + LABEL_OFFSET``. Training targets subtract the offset
(``detkit.data``), ``DetectionDecoder`` adds it back.

Detections (``detect``)
-----------------------
``DetectionDecoder`` decodes the anchor deltas, applies the sigmoid, keeps the
``pre_nms_top_k`` best anchors and runs per-class NMS (``tf.image.combined_non_max_suppression``),
for any batch size. Output, as the TF OD API exporter: ``detection_boxes`` float32
``[B, max_detections, 4]`` normalised ``[ymin, xmin, ymax, xmax]`` clipped to [0, 1];
``detection_classes`` float32 1-based ids; ``detection_scores`` float32 sorted descending;
``num_detections`` float32 ``[B]``. Entries past ``num_detections`` are zero.

Trained model (``save_trained`` / ``load_trained``)
---------------------------------------------------
A KerasHub preset folder (``config.json``, ``task.json``, ``preprocessor.json``,
``*.weights.h5``, ``metadata.json``) plus ``detkit.json`` (model name, ``image_size``,
``num_classes``, ``label_offset``, ``detection`` settings, training step) and a copy of
``label_map.pbtxt``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras_hub.src.models.retinanet.retinanet_label_encoder import RetinaNetLabelEncoder

from detkit.labelmap import LabelMapError, read_label_map

LABEL_OFFSET = 1
BOX_FORMAT = "yxyx"  # absolute pixels of the model input, as KerasHub's "yxyx"
INFO_FILE = "detkit.json"
LABEL_MAP_FILE = "label_map.pbtxt"


class ModelError(ValueError):
    """The model cannot be built or loaded: names the file or key to fix."""


# ---------------------------------------------------------------------------- label map


def load_label_map(records: Path) -> dict[int, str]:
    """The label map next to the records (``<records>/label_map.pbtxt``), ids 1..N without gaps."""
    path = Path(records) / LABEL_MAP_FILE
    try:
        label_map = read_label_map(path)
    except LabelMapError as exc:
        raise ModelError(str(exc)) from exc
    if sorted(label_map) != list(range(1, len(label_map) + 1)):
        raise ModelError(f"{path}: ids must be 1..{len(label_map)} without gaps, got {sorted(label_map)}")
    return label_map


def num_classes(records: Path) -> int:
    return len(load_label_map(records))


# ---------------------------------------------------------------------------- building


def find_preset(folder: Path) -> Path:
    """The KerasHub preset folder in ``folder`` (itself, or its only child holding config.json)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    children = sorted(p.parent for p in folder.glob("*/config.json")) if folder.is_dir() else []
    if len(children) == 1:
        return children[0]
    raise ModelError(
        f"{folder}: no KerasHub preset found (a folder with config.json, task.json and weights); "
        "run the 'pretrained' stage for a model with builder 'preset'"
    )


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


def build_detector(model_cfg, num_classes: int, pretrained: Path | None = None):
    """A fresh detector for ``num_classes`` classes, as ``model_cfg.builder`` says (see module doc)."""
    if model_cfg.builder == "retinanet":
        detector = _build_retinanet(model_cfg, num_classes)
    elif model_cfg.builder == "preset":
        if pretrained is None:
            raise ModelError(f"model '{model_cfg.name}': builder 'preset' needs the pretrained folder")
        detector = _build_from_preset(model_cfg, num_classes, find_preset(pretrained))
    else:
        raise ModelError(f"model '{model_cfg.name}': unknown builder '{model_cfg.builder}'")
    if model_cfg.freeze_batch_norm:
        freeze_batch_norms(detector.backbone.image_encoder)
    return detector


def _converter(scale, offset):
    # image_size=None: resizing is detkit.data.resize_image's job (stretch, see module doc),
    # the converter only scales.
    return keras_hub.layers.RetinaNetImageConverter(
        image_size=None, scale=[float(v) for v in scale], offset=[float(v) for v in offset]
    )


def _build_retinanet(m, num_classes: int):
    size = int(m.image_size)
    b = m.backbone
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
        min_level=int(m.min_level),
        max_level=int(m.max_level),
        use_p5=bool(m.use_p5),
        use_fpn_batch_norm=bool(m.use_fpn_batch_norm),
        image_shape=(size, size, 3),
    )
    anchor_generator = keras_hub.layers.AnchorGenerator(
        bounding_box_format=BOX_FORMAT,
        min_level=int(m.min_level),
        max_level=int(m.max_level),
        num_scales=int(m.anchors.num_scales),
        aspect_ratios=[float(a) for a in m.anchors.aspect_ratios],
        anchor_size=float(m.anchors.anchor_size),
    )
    preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=_converter(m.scale, m.offset))
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=num_classes,
        bounding_box_format=BOX_FORMAT,
        anchor_generator=anchor_generator,
        label_encoder=make_label_encoder(anchor_generator, m.matching),
        use_prediction_head_norm=bool(m.head.use_group_norm),
        classification_head_prior_probability=float(m.head.prior_probability),
        pre_logits_num_conv_layers=int(m.head.num_conv_layers),
        preprocessor=preprocessor,
    )
    heads = (detector.box_head, detector.classification_head)
    init_head_kernels([layer for head in heads for layer in (*head.conv_layers, head.prediction_layer)])
    set_prior_bias(detector, float(m.head.prior_probability))
    freeze_unused_fpn_norms(backbone)
    return detector


def _build_from_preset(m, num_classes: int, preset: Path):
    try:
        base = keras_hub.models.RetinaNetObjectDetector.from_preset(str(preset))
    except Exception as exc:  # a broken or foreign preset: name the folder
        raise ModelError(f"{preset}: cannot load as a KerasHub RetinaNet preset: {exc}") from exc
    converter = getattr(base.preprocessor, "image_converter", None)
    if converter is not None:
        preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(
            image_converter=_converter(converter.scale if converter.scale is not None else [1.0],
                                       converter.offset if converter.offset is not None else [0.0]))
    else:
        converter = _converter(m.scale, m.offset)
        preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter)
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
        classification_head_prior_probability=float(m.head.prior_probability),
        pre_logits_num_conv_layers=base.pre_logits_num_conv_layers,
        preprocessor=preprocessor,
        activation=base.activation,
    )
    # Everything but the class logits keeps the pretrained weights.
    detector.box_head.set_weights(base.box_head.get_weights())
    new_head, old_head = detector.classification_head, base.classification_head
    pairs = zip(new_head.conv_layers + new_head.group_norm_layers, old_head.conv_layers + old_head.group_norm_layers)
    for new, old in pairs:
        new.set_weights(old.get_weights())
    if base.num_classes == num_classes:
        new_head.prediction_layer.set_weights(old_head.prediction_layer.get_weights())
    else:
        init_head_kernels([new_head.prediction_layer])
        set_prior_bias(detector, float(m.head.prior_probability), reset_box_bias=False)
    freeze_unused_fpn_norms(backbone)
    return detector


def input_size(detector) -> int:
    """The square model input size (the backbone's static image shape)."""
    shape = detector.backbone.image_shape
    if shape[0] is None:
        raise ModelError("the detector has no static input size; build it with model.image_size")
    return int(shape[0])


# ---------------------------------------------------------------------------- detecting


def preprocess(detector, images):
    """``images`` float32 [B, S, S, 3] in [0, 255] (``detkit.data.resize_image``) -> model input."""
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


def detection_function(detector, decoder=None):
    """``detect`` compiled into one graph, for batches of resized images float32 [B, S, S, 3].

    Graph execution frees each layer's activations once they are consumed; an eager call of
    the Keras model keeps them all until it returns: for ResNet-50 at 800 px about 2 GB per
    image, so eval's batch of 16 did not fit in 24 GB (in a graph: about 1.4 GB at batch 2).
    """
    size = input_size(detector)
    decoder = decoder or make_decoder(detector)
    anchors = anchors_for(detector, size)
    return tf.function(lambda images: detect(detector, images, decoder, anchors),
                       input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])


# ---------------------------------------------------------------------------- saving


def save_trained(detector, folder: Path, info: dict[str, Any], label_map_path: Path | None = None) -> None:
    """Write the trained model as a KerasHub preset + ``detkit.json`` (+ label map) into ``folder``."""
    folder = Path(folder)
    detector.save_to_preset(str(folder))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if label_map_path is not None:
        shutil.copyfile(label_map_path, folder / LABEL_MAP_FILE)


def load_trained(folder: Path) -> tuple[Any, dict[str, Any]]:
    """``(detector, info)`` from a folder written by ``save_trained`` (``models/checkpoints/final``)."""
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file():
        raise ModelError(f"{folder}: not a trained model folder ({INFO_FILE} missing); run the train stage")
    info = json.loads((folder / INFO_FILE).read_text())
    detector = keras_hub.models.RetinaNetObjectDetector.from_preset(str(folder))
    return detector, info
