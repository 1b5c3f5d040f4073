"""Stand-in builder for the KerasHub preset ``resnet_101_imagenet`` (the ``faster_rcnn`` family's
ResNet-101, ``conf/model/faster_rcnn_resnet101.yaml``); ``benchmarks.standin_preset`` saves, checks
and packs it.

The preset is what KerasHub's ``tools/checkpoint_conversion/convert_resnet_checkpoints.py``
(keras-team/keras-hub) saves: ``keras_hub.models.ImageClassifier.from_preset("hf://timm/resnet101.a1_in1k")``,
i.e. a ``ResNetImageClassifier`` as KerasHub's timm loader builds it
(``keras_hub/src/utils/timm/preset_loader.py`` and ``convert_resnet.py``):

- backbone: ``convert_resnet.convert_backbone_config`` for timm's architecture ``resnet101``:
  stem 64 filters 7x7; ``bottleneck_block`` stacks [3, 4, 23, 3] of [64, 128, 256, 512] filters,
  strides [1, 2, 2, 2]; no pre-activation (a ``resnet``, not ``resnetv2_``); image shape
  (None, None, 3);
- head: ``ResNetImageClassifier(num_classes=1000)`` (timm's ``num_classes`` for ``resnet101.a1_in1k``)
  with the classifier's defaults (average pooling, no activation, no dropout);
- image converter: ``preset_loader.load_image_converter`` from timm's ``pretrained_cfg`` of
  ``resnet101.a1_in1k`` (timm ``resnet.py``: ``_rcfg`` over ``_cfg``): input size 224 x 224,
  ``bicubic``, ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) as
  ``scale = 1 / 255 / std`` and ``offset = -mean / std``.

Checks: the backbone's parameter count equals the installed ``resnet_presets.py`` metadata
(42,605,504; the 1000-class head adds 2,049,000, so the saved classifier has 44,654,504), and every
variable is one that timm's ``convert_weights`` and ``convert_head`` fill from the timm state
dict, each exactly once (replayed on the stand-in, as for the RetinaNet stand-in).
"""

from __future__ import annotations

from collections.abc import Callable

PRESETS = ("resnet_101_imagenet",)
IMAGENET_CLASSES = 1000
IMAGE_SIZE = 224  # timm pretrained_cfg input_size (3, 224, 224)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET_V1 = dict(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
                 stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block", use_pre_activation=False)
BLOCKS = {"resnet_101_imagenet": [3, 4, 23, 3]}  # convert_resnet: resnet101


def imagenet_scaling() -> dict[str, list[float]]:
    """torchvision's and timm's ImageNet normalisation as a KerasHub image converter's scale and offset."""
    return {"scale": [1.0 / 255.0 / s for s in IMAGENET_STD],
            "offset": [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]}


def build(preset: str):
    """The preset's image classifier, randomly initialised (module doc: where each value comes from)."""
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(**RESNET_V1, stackwise_num_blocks=BLOCKS[preset])
    converter = keras_hub.layers.ResNetImageConverter(image_size=(IMAGE_SIZE, IMAGE_SIZE), interpolation="bicubic",
                                                      **imagenet_scaling())
    preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter)
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=IMAGENET_CLASSES,
                                                  preprocessor=preprocessor)


def counted(task):
    """The model whose parameters the preset metadata counts: the backbone."""
    return task.backbone


def encoder_targets(encoder, port: Callable, prefix: str) -> None:
    """``port(variable, key)`` for each variable of a v1 ``ResNetBackbone`` as torchvision and timm
    name it (``conv1``, ``bn1``, ``layer<n>.<block>.conv<i>`` ...), after ``prefix``: KerasHub's
    timm ``convert_weights`` (v1 branch) and RetinaNet's ``convert_image_encoder`` port the same keys."""

    def conv(name: str, key: str) -> None:
        port(encoder.get_layer(name).kernel, f"{prefix}{key}.weight")

    def batch_norm(name: str, key: str) -> None:
        layer = encoder.get_layer(name)
        for variable, suffix in ((layer.gamma, "weight"), (layer.beta, "bias"), (layer.moving_mean, "running_mean"),
                                 (layer.moving_variance, "running_var")):
            port(variable, f"{prefix}{key}.{suffix}")

    conv("conv1_conv", "conv1")
    batch_norm("conv1_bn", "bn1")
    for stack in range(len(encoder.stackwise_num_filters)):
        for block in range(encoder.stackwise_num_blocks[stack]):
            keras_name, torch_name = f"stack{stack}_block{block}", f"layer{stack + 1}.{block}"
            if block == 0 and (encoder.block_type == "bottleneck_block" or stack > 0):
                conv(f"{keras_name}_0_conv", f"{torch_name}.downsample.0")
                batch_norm(f"{keras_name}_0_bn", f"{torch_name}.downsample.1")
            for i in (1, 2, 3) if encoder.block_type == "bottleneck_block" else (1, 2):
                conv(f"{keras_name}_{i}_conv", f"{torch_name}.conv{i}")
                batch_norm(f"{keras_name}_{i}_bn", f"{torch_name}.bn{i}")


def conversion_targets(task, port: Callable) -> None:
    """timm's ``convert_weights`` (v1) and ``convert_head`` replayed on the classifier."""
    encoder_targets(task.backbone, port, "")
    port(task.output_dense.kernel, "fc.weight")
    port(task.output_dense.bias, "fc.bias")


def facts(task) -> dict:
    backbone = task.backbone
    return {"blocks": list(backbone.stackwise_num_blocks), "block_type": backbone.block_type,
            "classes": int(task.output_dense.units), "image_size": list(task.preprocessor.image_converter.image_size)}


def describe(f: dict) -> str:
    return (f"ResNet {f['block_type']} stacks {f['blocks']}, a {f['classes']}-class head, "
            f"{f['image_size'][0]} px image converter")
