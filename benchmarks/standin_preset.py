"""A local stand-in for the KerasHub preset ``retinanet_resnet50_fpn_coco``: its exact
architecture with random weights, saved with ``save_to_preset`` and packed as a ``.tar.gz``
for the pretrained stage's archive path (``model.pretrained`` + ``pretrained_sha256``).

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

Two checks, both printed: the parameter count equals the preset's in the installed
``retinanet_presets.py`` metadata (34,121,239; 80 classes would give 33,893,044), and every
variable is one that the conversion script fills from the torchvision state dict, each
exactly once (its port functions replayed on the stand-in: no variable left at random
init in the real preset, none missing from the stand-in).

    python -m benchmarks.standin_preset --out /tmp/preset   # writes <out>/<preset>.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

from detkit.core.fsio import atomic_write_bytes, atomic_write_json
from sample.make_sample import tar_gz

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PRESET = "retinanet_resnet50_fpn_coco"
COCO_CATEGORIES = 91  # torchvision's COCO_V1 weights meta: 80 classes, "__background__" and 10 "N/A" ids
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESOLUTION = 800  # torchvision's transform min_size for these weights
RESNET_50 = dict(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
                 stackwise_num_blocks=[3, 4, 6, 3], stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
                 use_pre_activation=False)
SEED = 34121239


def preset_metadata() -> dict:
    """The installed KerasHub's metadata of the preset (parameter count, handle)."""
    from keras_hub.src.models.retinanet.retinanet_presets import backbone_presets

    return backbone_presets[PRESET]


def build(seed: int = SEED):
    """The preset's detector, randomly initialised (see the module doc for where each value comes from)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    image_encoder = keras_hub.models.ResNetBackbone(**RESNET_50)
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=image_encoder, min_level=3, max_level=7, use_p5=False)
    converter = keras_hub.layers.RetinaNetImageConverter(
        image_size=(RESOLUTION, RESOLUTION), pad_to_aspect_ratio=True, crop_to_aspect_ratio=False,
        scale=[1.0 / 255.0 / s for s in IMAGENET_STD], offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter)
    return keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=COCO_CATEGORIES,
                                                    preprocessor=preprocessor, use_prediction_head_norm=False)


def conversion_targets(detector) -> dict[int, str]:
    """``id(variable)`` -> torchvision state-dict key, as the conversion script ports them for this preset.

    Replays its ``convert_image_encoder``, ``convert_fpn`` and ``convert_head_weights``
    (``retinanet_resnet50_fpn_coco`` branch); a layer the script names that the stand-in lacks
    raises here, as ``get_layer`` would there.
    """
    targets: dict[int, str] = {}

    def port(variable, key: str) -> None:
        if id(variable) in targets:
            raise AssertionError(f"{variable.path} is ported twice ({targets[id(variable)]}, {key})")
        targets[id(variable)] = key

    encoder = detector.backbone.image_encoder

    def conv(name: str, prefix: str) -> None:
        port(encoder.get_layer(name).kernel, f"{prefix}.weight")

    def batch_norm(name: str, prefix: str) -> None:
        layer = encoder.get_layer(name)
        for variable, suffix in ((layer.gamma, "weight"), (layer.beta, "bias"), (layer.moving_mean, "running_mean"),
                                 (layer.moving_variance, "running_var")):
            port(variable, f"{prefix}.{suffix}")

    conv("conv1_conv", "backbone.body.conv1")
    batch_norm("conv1_bn", "backbone.body.bn1")
    for stack in range(len(encoder.stackwise_num_filters)):
        for block in range(encoder.stackwise_num_blocks[stack]):
            keras_name, torch_name = f"stack{stack}_block{block}", f"backbone.body.layer{stack + 1}.{block}"
            if block == 0 and (encoder.block_type == "bottleneck_block" or stack > 0):
                conv(f"{keras_name}_0_conv", f"{torch_name}.downsample.0")
                batch_norm(f"{keras_name}_0_bn", f"{torch_name}.downsample.1")
            for i in (1, 2, 3) if encoder.block_type == "bottleneck_block" else (1, 2):
                conv(f"{keras_name}_{i}_conv", f"{torch_name}.conv{i}")
                batch_norm(f"{keras_name}_{i}_bn", f"{torch_name}.bn{i}")

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
    return targets


def verify(detector) -> dict:
    """Check the stand-in against the preset's metadata and the conversion script; raise on a mismatch."""
    expected = preset_metadata()["metadata"]["params"]
    parameters = int(detector.count_params())
    if parameters != expected:
        raise AssertionError(f"stand-in has {parameters:,} parameters, the preset {PRESET} has {expected:,}")
    targets = conversion_targets(detector)
    variables = {id(v): v.path for v in detector.weights}
    if set(targets) != set(variables):
        missing = sorted(variables[i] for i in set(variables) - set(targets))
        raise AssertionError(f"variables the conversion script does not fill: {missing[:5]}; "
                             f"{len(set(targets) - set(variables))} ported variables are not the model's weights")
    anchors = detector.anchor_generator
    return {
        "parameters": parameters,
        "variables": len(variables),
        "torch_tensors": len(set(targets.values())),
        "levels": f"P{detector.backbone.min_level}-P{detector.backbone.max_level}",
        "anchors_per_location": anchors.num_base_anchors,
        "class_outputs": int(detector.classification_head.prediction_layer.filters),
        "box_outputs": int(detector.box_head.prediction_layer.filters),
    }


def write(out: Path) -> dict:
    """Build, verify and save the stand-in; ``<out>/<PRESET>.tar.gz`` plus what the pretrained stage needs."""
    detector = build()
    checks = verify(detector)
    with tempfile.TemporaryDirectory() as tmp:
        detector.save_to_preset(str(Path(tmp) / PRESET))
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    data = tar_gz(files)
    archive = Path(out) / f"{PRESET}.tar.gz"
    atomic_write_bytes(archive, data)
    return {"archive": str(archive), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "files": sorted(files), **checks}


def describe(info: dict) -> str:
    return (f"stand-in {PRESET}: {info['parameters']:,} parameters = the installed preset metadata's "
            f"{preset_metadata()['metadata']['params']:,} (checked); layer structure: all {info['variables']} "
            f"variables are exactly the {info['torch_tensors']} torchvision tensors KerasHub's conversion script "
            f"ports, each once (checked); FPN {info['levels']}, {info['anchors_per_location']} anchors per location, "
            f"class head {info['class_outputs']} outputs (9 x {COCO_CATEGORIES}), box head {info['box_outputs']}; "
            f"random weights; {Path(info['archive']).name} {info['size'] / 1e6:.0f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .tar.gz (and info.json)")
    args = parser.parse_args(argv)
    info = write(args.out)
    atomic_write_json(args.out / "info.json", info)
    print(describe(info))


if __name__ == "__main__":
    main()
