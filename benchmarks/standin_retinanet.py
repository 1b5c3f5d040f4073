"""Stand-in builder for the KerasHub preset ``retinanet_resnet50_fpn_coco`` (the default run's,
``conf/model/retinanet_resnet50.yaml``); ``benchmarks.standin_preset`` saves, checks and packs it.

The architecture is KerasHub's own conversion of torchvision's ``retinanet_resnet50_fpn``
(``tools/checkpoint_conversion/convert_retinanet_checkpoints.py`` in keras-team/keras-hub):

- image encoder: ``Backbone.from_preset("resnet_50_imagenet")``, i.e. timm's ``resnet50``
  as KerasHub's timm converter configures it (stem 64 filters 7x7; bottleneck blocks
  [3, 4, 6, 3] of [64, 128, 256, 512] filters, strides [1, 2, 2, 2]; no pre-activation;
  image shape (None, None, 3));
- ``RetinaNetBackbone(min_level=3, max_level=7, use_p5=False)``, no FPN batch norm;
- ``RetinaNetObjectDetector(num_classes=len(torchvision COCO categories) = 91,
  use_prediction_head_norm=False)`` with the detector's defaults: 4 head convs of 256
  filters, anchors 3 scales x ratios [0.5, 1, 2] of size 4, prior 0.01, "yxyx" boxes;
- ``RetinaNetImageConverter(image_size=(800, 800), pad_to_aspect_ratio=True,
  crop_to_aspect_ratio=False)`` with torchvision's ImageNet mean/std as scale and offset.

Checks: the detector's parameter count equals the preset's in the installed
``retinanet_presets.py`` metadata (34,121,239; 80 classes would give 33,893,044), and every
variable is one that the conversion script fills from the torchvision state dict, each
exactly once (its port functions replayed on the stand-in: no variable left at random
init in the real preset, none missing from the stand-in).
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.standin_resnet import RESNET_V1, encoder_targets, imagenet_scaling

PRESETS = ("retinanet_resnet50_fpn_coco",)
COCO_CATEGORIES = 91  # torchvision's COCO_V1 weights meta: 80 classes, "__background__" and 10 "N/A" ids
RESOLUTION = 800  # torchvision's transform min_size for these weights


def build(preset: str):
    """The preset's detector, randomly initialised (module doc: where each value comes from)."""
    import keras_hub

    image_encoder = keras_hub.models.ResNetBackbone(**RESNET_V1, stackwise_num_blocks=[3, 4, 6, 3])
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=image_encoder, min_level=3, max_level=7, use_p5=False)
    converter = keras_hub.layers.RetinaNetImageConverter(
        image_size=(RESOLUTION, RESOLUTION), pad_to_aspect_ratio=True, crop_to_aspect_ratio=False, **imagenet_scaling())
    preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter)
    return keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=COCO_CATEGORIES,
                                                    preprocessor=preprocessor, use_prediction_head_norm=False)


def counted(task):
    """The model whose parameters the preset metadata counts: the whole detector (heads included)."""
    return task


def conversion_targets(detector, port: Callable) -> None:
    """``port(variable, torchvision key)`` as the conversion script ports them for this preset.

    Replays its ``convert_image_encoder``, ``convert_fpn`` and ``convert_head_weights``
    (``retinanet_resnet50_fpn_coco`` branch); a layer the script names that the stand-in lacks
    raises here, as ``get_layer`` would there.
    """
    encoder_targets(detector.backbone.image_encoder, port, "backbone.body.")

    def conv_with_bias(layer, prefix: str) -> None:
        port(layer.kernel, f"{prefix}.weight")
        port(layer.bias, f"{prefix}.bias")

    fpn = detector.backbone.feature_pyramid
    for level, layer in fpn.lateral_conv_layers.items():
        conv_with_bias(layer, f"backbone.fpn.inner_blocks.{int(level[1]) - 3}.0")
    for level, layer in fpn.output_conv_layers.items():
        if "output" in layer.name:
            conv_with_bias(layer, f"backbone.fpn.layer_blocks.{int(level[1]) - 3}.0")
        if "coarser" in layer.name:
            conv_with_bias(layer, f"backbone.fpn.extra_blocks.p{int(level[1])}")

    for head, torch_head, output in ((detector.box_head, "regression_head", "bbox_reg"),
                                     (detector.classification_head, "classification_head", "cls_logits")):
        for i, layer in enumerate(head.conv_layers):
            conv_with_bias(layer, f"head.{torch_head}.conv.{i}.0")
        for i, layer in enumerate(head.group_norm_layers):
            port(layer.gamma, f"head.{torch_head}.conv.{i}.1.weight")
            port(layer.beta, f"head.{torch_head}.conv.{i}.1.bias")
        conv_with_bias(head.prediction_layer, f"head.{torch_head}.{output}")


def facts(detector) -> dict:
    return {"levels": f"P{detector.backbone.min_level}-P{detector.backbone.max_level}",
            "anchors_per_location": detector.anchor_generator.num_base_anchors,
            "class_outputs": int(detector.classification_head.prediction_layer.filters),
            "box_outputs": int(detector.box_head.prediction_layer.filters)}


def describe(f: dict) -> str:
    return (f"FPN {f['levels']}, {f['anchors_per_location']} anchors per location, class head "
            f"{f['class_outputs']} outputs ({f['anchors_per_location']} x {COCO_CATEGORIES}), "
            f"box head {f['box_outputs']}")
