"""Stand-in builders for the KerasHub D-FINE presets the ``dfine`` model files start from
(``dfine_small_obj2coco``: ``conf/model/dfine_small.yaml``; ``dfine_medium_obj2coco``:
``conf/model/dfine_medium.yaml``; their COCO-only siblings ``dfine_small_coco`` and
``dfine_medium_coco`` have the same architecture); ``benchmarks.standin_preset`` saves, checks and
packs them.

Where each value comes from. KerasHub's ``tools/checkpoint_conversion/convert_d_fine_checkpoints.py``
(keras-team/keras-hub) builds each preset from the Hugging Face checkpoint's ``config.json``
(``ustc-community/dfine-small-obj2coco`` ...): ``get_keras_model`` maps its keys onto
``HGNetV2Backbone`` and ``DFineBackbone`` (``stackwise_stage_filters`` = per stage [in, mid, out,
blocks, layers, kernel]; ``anchor_image_size`` (640, 640); ``seed`` 0), then a
``DFineObjectDetector(num_classes=len(id2label), bounding_box_format="yxyx")`` with a
``DFineImageConverter(image_size=(640, 640), crop_to_aspect_ratio=True)``, and saves it with
``save_to_preset``. Those ``config.json`` files were written by Hugging Face transformers'
``models/d_fine/convert_d_fine_original_pytorch_checkpoint_to_hf.py``: ``get_d_fine_config`` starts
from ``DFineConfig()``'s defaults (``configuration_d_fine.py``) and sets, per size:

- every size: 80 COCO labels (``coco-detection-mmdet-id2label.json``; 366 only for ``*_obj365``),
  backbone ``embedding_size`` 32, ``layer_type`` basic;
- small (``dfine_s_*``, HGNetV2-B0): stem [3, 16, 16]; stages in [16, 64, 256, 512], mid [16, 32,
  64, 128], out [64, 256, 512, 1024], blocks [1, 1, 2, 1], layers [3, 3, 3, 3], kernels [3, 3, 5,
  5], downsample [F, T, T, T], light blocks [F, F, T, T], learnable affine blocks; hidden sizes
  [128, 256, 512, 1024]; ``encoder_in_channels`` [256, 512, 1024]; ``hidden_expansion`` 0.5;
  ``depth_mult`` 0.34; 3 decoder layers; ``decoder_n_points`` [3, 6, 3];
- medium (``dfine_m_*``, HGNetV2-B2): stem [3, 24, 32]; stages in [32, 96, 384, 768], mid [32, 64,
  128, 256], out [96, 384, 768, 1536], blocks [1, 1, 3, 1], layers [4, 4, 4, 4], kernels [3, 3, 5,
  5], the same downsample and light blocks, learnable affine blocks; hidden sizes [192, 384, 768,
  1536]; ``encoder_in_channels`` [384, 768, 1536]; ``hidden_expansion`` 1.0; ``depth_mult`` 0.67;
  4 decoder layers; ``decoder_n_points`` [3, 6, 3];
- ``DFineConfig`` defaults for the rest: ``encoder_hidden_dim`` 256, ``d_model`` 256,
  ``decoder_in_channels`` [256, 256, 256], ``feat_strides`` [8, 16, 32], ``num_feature_levels`` 3,
  ``encode_proj_layers`` [2], 8 encoder and 8 decoder attention heads, ``encoder_ffn_dim`` and
  ``decoder_ffn_dim`` 1024, 1 encoder layer, 300 queries, ``learn_initial_query`` False,
  ``eval_idx`` -1, ``lqe_hidden_dim`` 64, 2 LQE layers, label noise 0.5, box noise 1.0; the
  HGNetV2 config's defaults: ``hidden_act`` relu, ``depths`` [3, 4, 6, 3] (recorded in the
  KerasHub config, no layer depends on it), out features stage2-stage4 (strides 8, 16, 32);
- ``num_denoising`` 0, where ``DFineConfig``'s default is 100: with 100, ``DFineBackbone`` adds the
  denoising class embedding ((80 + 1) x 256 = 20,736 parameters), and the installed metadata's
  counts are exactly those without it (small 10,329,321, medium 19,621,160; and ``*_obj365``
  minus ``*_coco`` is exactly the four class heads' 4 x 257 x 286 = 294,008). The ``dfine`` family
  builds its model with ``num_denoising: 0`` whatever the preset says, so the value changes nothing
  downstream of the pretrained stage;
- image converter: the checkpoint's ``preprocessor_config.json`` (an ``RTDetrImageProcessor``:
  rescale by 1/255, no normalisation), so ``scale`` 1/255 and no offset: pixels in [0, 1];
- detector: ``DFineObjectDetector``'s matcher and loss defaults, which equal ``DFineConfig``'s
  that the script passes (costs 2 / 5 / 2, focal alpha 0.25 and gamma 2, weights vfl 1, bbox 5,
  giou 2, fgl 0.15, ddf 1.5).

Check: the ``DFineBackbone``'s parameter count equals the installed ``d_fine_presets.py`` metadata
(the detector adds none). Unlike the RetinaNet and ResNet stand-ins, the conversion script's
weight transfer (hundreds of lines over the Hugging Face state dict) is not replayed.
"""

from __future__ import annotations

PRESETS = ("dfine_small_obj2coco", "dfine_small_coco", "dfine_medium_obj2coco", "dfine_medium_coco")
COCO_LABELS = 80
RESOLUTION = 640
# Per size: get_d_fine_config's values (module doc); the keys are KerasHub's.
SIZES = {
    "small": {
        "hgnet": dict(stem_channels=[3, 16, 16], hidden_sizes=[128, 256, 512, 1024],
                      stage_in=[16, 64, 256, 512], stage_mid=[16, 32, 64, 128], stage_out=[64, 256, 512, 1024],
                      stage_blocks=[1, 1, 2, 1], stage_layers=[3, 3, 3, 3]),
        "dfine": dict(encoder_in_channels=[256, 512, 1024], hidden_expansion=0.5, depth_multiplier=0.34,
                      num_decoder_layers=3),
    },
    "medium": {
        "hgnet": dict(stem_channels=[3, 24, 32], hidden_sizes=[192, 384, 768, 1536],
                      stage_in=[32, 96, 384, 768], stage_mid=[32, 64, 128, 256], stage_out=[96, 384, 768, 1536],
                      stage_blocks=[1, 1, 3, 1], stage_layers=[4, 4, 4, 4]),
        "dfine": dict(encoder_in_channels=[384, 768, 1536], hidden_expansion=1.0, depth_multiplier=0.67,
                      num_decoder_layers=4),
    },
}
OUT_FEATURES = ["stage2", "stage3", "stage4"]
# DFineConfig's defaults, as get_keras_model passes them.
DECODER = dict(decoder_in_channels=[256, 256, 256], encoder_hidden_dim=256, hidden_dim=256, num_queries=300,
               learn_initial_query=False, feat_strides=[8, 16, 32], num_feature_levels=3, encode_proj_layers=[2],
               num_attention_heads=8, encoder_ffn_dim=1024, num_encoder_layers=1, eval_idx=-1,
               decoder_attention_heads=8, decoder_ffn_dim=1024, decoder_n_points=[3, 6, 3], lqe_hidden_dim=64,
               num_lqe_layers=2, label_noise_ratio=0.5, box_noise_scale=1.0)


def size(preset: str) -> str:
    return preset.split("_")[1]


def build(preset: str):
    """The preset's detector, randomly initialised (module doc: where each value comes from)."""
    import keras_hub

    h, d = SIZES[size(preset)]["hgnet"], SIZES[size(preset)]["dfine"]
    filters = [list(stage) for stage in zip(h["stage_in"], h["stage_mid"], h["stage_out"], h["stage_blocks"],
                                            h["stage_layers"], [3, 3, 5, 5])]
    hgnet = keras_hub.models.HGNetV2Backbone(
        depths=[3, 4, 6, 3], embedding_size=32, hidden_sizes=h["hidden_sizes"], stem_channels=h["stem_channels"],
        hidden_act="relu", use_learnable_affine_block=True, stackwise_stage_filters=filters,
        apply_downsample=[False, True, True, True], use_lightweight_conv_block=[False, False, True, True],
        out_features=OUT_FEATURES)
    backbone = keras_hub.models.DFineBackbone(
        backbone=hgnet, **DECODER, **d, num_labels=COCO_LABELS, num_denoising=0,
        anchor_image_size=(RESOLUTION, RESOLUTION), image_shape=(None, None, 3), out_features=OUT_FEATURES, seed=0)
    converter = keras_hub.layers.DFineImageConverter(image_size=(RESOLUTION, RESOLUTION), scale=1.0 / 255.0,
                                                     offset=None, crop_to_aspect_ratio=True)
    preprocessor = keras_hub.models.DFineObjectDetectorPreprocessor(image_converter=converter)
    return keras_hub.models.DFineObjectDetector(backbone=backbone, num_classes=COCO_LABELS,
                                                bounding_box_format="yxyx", preprocessor=preprocessor)


def counted(task):
    """The model whose parameters the preset metadata counts: the ``DFineBackbone``."""
    return task.backbone


def facts(task) -> dict:
    backbone, hgnet = task.backbone, task.backbone.backbone
    return {"stages": [list(s) for s in hgnet.stackwise_stage_filters], "hgnet_parameters": int(hgnet.count_params()),
            "decoder_layers": backbone.num_decoder_layers, "queries": backbone.num_queries,
            "labels": backbone.num_labels, "image_size": list(task.preprocessor.image_converter.image_size)}


def describe(f: dict) -> str:
    return (f"HGNetV2 stages (in, mid, out, blocks, layers, kernel) {f['stages']} ({f['hgnet_parameters']:,} "
            f"parameters), {f['decoder_layers']} decoder layers, {f['queries']} queries, {f['labels']} labels, "
            f"{f['image_size'][0]} px image converter")
