"""detkit.models.retinanet: building, the prior-bias fix, preset head replacement, and TF OD API decoding."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from detkit.config import load_config
from detkit.models import family as F
from detkit.models import retinanet as M

SIZE = 64  # small input: fast, still two FPN levels (8x8 and 4x4)


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = load_config(overrides=["dataset=sample", "model=retinanet_tiny", f"model.image_size={SIZE}"])
    return cfg.model


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    return M.FAMILY.build(tiny_cfg, 37, None).model


def test_decoder_config_mirrors_its_arguments():
    args = {
        "image_size": 96, "max_detections": 7, "max_detections_per_class": 3, "score_threshold": 0.2,
        "iou_threshold": 0.6, "pre_nms_top_k": 50, "label_offset": 1, "box_variance": [0.1, 0.1, 0.2, 0.2],
        "from_logits": False,
    }
    decoder = M.DetectionDecoder(**args, name="decoder")
    config = decoder.get_config()
    assert {k: config[k] for k in args} == args
    clone = M.DetectionDecoder.from_config(config)
    assert {k: clone.get_config()[k] for k in args} == args


def test_tiny_model_is_the_recipe(tiny, tiny_cfg):
    assert 2.0e6 < tiny.count_params() < 2.6e6  # conf/model/retinanet_tiny.yaml: about 2.2M parameters
    assert M.input_size(tiny) == SIZE
    assert tiny.num_classes == 37
    assert tiny.anchor_generator.num_base_anchors == 3  # 3 square anchors per location
    assert (tiny.anchor_generator.min_level, tiny.anchor_generator.max_level) == (3, 4)
    assert tiny.pre_logits_num_conv_layers == 0
    anchors = M.anchors_for(tiny, SIZE)
    assert anchors.shape == (3 * (8 * 8 + 4 * 4), 4)


def test_training_targets_are_pixels_of_the_model_input_with_padding_kept():
    boxes = tf.constant([[0.25, 0.5, 0.75, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    labels = tf.constant([4.0, -1.0])
    targets = M.FAMILY.training_targets(boxes, labels, 64)
    np.testing.assert_array_equal(targets["boxes"].numpy(), [[16.0, 32.0, 48.0, 64.0], [-1.0, -1.0, -1.0, -1.0]])
    np.testing.assert_array_equal(targets["labels"].numpy(), [4.0, -1.0])


def test_prior_bias_is_on_the_class_head_not_the_box_head(tiny, tiny_cfg):
    prior = tiny_cfg.prior_probability
    cls_bias = tiny.classification_head.prediction_layer.bias.numpy()
    box_bias = tiny.box_head.prediction_layer.bias.numpy()
    np.testing.assert_allclose(cls_bias, -math.log((1 - prior) / prior), rtol=1e-6)
    np.testing.assert_array_equal(box_bias, 0.0)


def test_detect_gives_tf_od_api_outputs_for_any_batch(tiny, tiny_cfg):
    decoder = M.make_decoder(tiny, tiny_cfg.detection, score_threshold=0.0)
    serve = tf.function(lambda images: M.detect(tiny, images, decoder),
                        input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
    for batch in (1, 3):
        images = tf.random.uniform((batch, SIZE, SIZE, 3), 0, 255, seed=batch)
        out = {k: v.numpy() for k, v in serve(images).items()}
        assert out["detection_boxes"].shape == (batch, 100, 4)
        assert out["detection_classes"].shape == out["detection_scores"].shape == (batch, 100)
        assert out["num_detections"].shape == (batch,)
        assert all(v.dtype == np.float32 for v in out.values())
        for i in range(batch):
            n = int(out["num_detections"][i])
            assert n > 0
            boxes, classes, scores = out["detection_boxes"][i], out["detection_classes"][i], out["detection_scores"][i]
            assert ((boxes >= 0) & (boxes <= 1)).all()
            assert (boxes[:n, 0] <= boxes[:n, 2]).all() and (boxes[:n, 1] <= boxes[:n, 3]).all()
            assert set(classes[:n]) <= set(range(1, 38))  # 1-based label-map ids
            assert (np.diff(scores[:n]) <= 0).all()  # sorted descending
            assert (classes[n:] == 0).all() and (scores[n:] == 0).all() and (boxes[n:] == 0).all()


def test_decoder_offsets_labels_and_keeps_one_box_per_class():
    """Two anchors on the same spot: class 0 and class 2 both survive (per-class NMS); 1-based out."""
    size = 100
    anchors = tf.constant([[10.0, 20.0, 50.0, 60.0], [12.0, 20.0, 52.0, 60.0], [60.0, 60.0, 90.0, 95.0]])
    deltas = tf.zeros((1, 3, 4))
    logits = np.full((1, 3, 4), -10.0, np.float32)
    logits[0, 0, 0] = 3.0  # anchor 0: class 0 (id 1), best
    logits[0, 1, 0] = 2.0  # anchor 1: class 0 again, overlaps anchor 0 -> suppressed
    logits[0, 1, 2] = 1.0  # anchor 1: class 2 (id 3): another class, kept despite the overlap
    decoder = M.DetectionDecoder(image_size=size, max_detections=5, score_threshold=0.5)
    out = {k: v.numpy() for k, v in decoder(deltas, tf.constant(logits), anchors).items()}
    assert out["num_detections"][0] == 2
    np.testing.assert_allclose(out["detection_classes"][0, :2], [1, 3])
    np.testing.assert_allclose(out["detection_scores"][0, :2], 1 / (1 + np.exp([-3.0, -1.0])), rtol=1e-6)
    np.testing.assert_allclose(out["detection_boxes"][0, 0], [0.10, 0.20, 0.50, 0.60], atol=1e-6)
    np.testing.assert_allclose(out["detection_boxes"][0, 1], [0.12, 0.20, 0.52, 0.60], atol=1e-6)


def test_decoder_inverts_the_label_encoder(tiny):
    """Targets the label encoder makes for a box decode back to that box: one box convention."""
    gt = np.array([[[8.0, 12.0, 40.0, 36.0], [-1, -1, -1, -1]]], np.float32)  # yxyx pixels, one padding row
    images = tf.zeros((1, SIZE, SIZE, 3))
    deltas, classes = tiny.label_encoder(images=images, gt_boxes=tf.constant(gt),
                                         gt_classes=tf.constant([[6.0, -1.0]]))
    positive = np.nonzero(classes.numpy()[0] == 6)[0]
    assert len(positive) >= 1  # force_match: every box gets an anchor
    logits = np.full((1, deltas.shape[1], 37), -10.0, np.float32)
    logits[0, positive, 6] = 5.0
    decoder = M.DetectionDecoder(image_size=SIZE, score_threshold=0.5)
    out = decoder(deltas, tf.constant(logits), M.anchors_for(tiny, SIZE))
    assert int(out["num_detections"][0]) >= 1
    assert out["detection_classes"][0, 0] == 7
    np.testing.assert_allclose(out["detection_boxes"][0, 0], gt[0, 0] / SIZE, atol=1e-4)


def test_preset_builder_replaces_only_the_class_logits(tiny_cfg, tmp_path):
    coco_like = M.FAMILY.build(tiny_cfg, 5, None).model
    coco_like.classification_head.prediction_layer.bias.assign(np.full((15,), 0.5, np.float32))
    coco_like.save_to_preset(str(tmp_path / "preset"))
    # At another input size than the preset's: same weights, new static input size.
    preset_cfg = OmegaConf.merge(tiny_cfg, {"architecture": None, "pretrained": "local", "image_size": 96})
    built = M.FAMILY.build(preset_cfg, 37, tmp_path)  # finds the preset one level down
    detector = built.model
    assert M.input_size(detector) == 96 and M.anchors_for(detector, 96).shape == (3 * (12 * 12 + 6 * 6), 4)
    assert detector.num_classes == 37
    assert detector.classification_head.prediction_layer.bias.shape == (3 * 37,)
    class_logits = detector.classification_head.prediction_layer
    assert sorted(built.new) == sorted(w.path for w in class_logits.weights)
    assert built.kept == len(detector.weights) - len(class_logits.weights) == built.total - 2
    np.testing.assert_allclose(detector.classification_head.prediction_layer.bias.numpy(),
                               -math.log(99), rtol=1e-6)
    for new, old in ((detector.backbone, coco_like.backbone), (detector.box_head, coco_like.box_head)):
        for a, b in zip(new.get_weights(), old.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_missing_preset_is_named(tiny_cfg, tmp_path):
    preset_cfg = OmegaConf.merge(tiny_cfg, {"architecture": None, "pretrained": "local"})
    with pytest.raises(F.ModelError, match="no KerasHub preset found"):
        M.FAMILY.build(preset_cfg, 37, tmp_path)


def test_trained_model_round_trips(tiny, tiny_cfg, tmp_path, sample_records):
    info = {"model": "retinanet_tiny", "image_size": SIZE, "num_classes": 37,
            "detection": dict(tiny_cfg.detection), "label_offset": 1}
    F.save_trained(M.FAMILY, tiny, tmp_path / "final", info, sample_records / "label_map.pbtxt")
    fam, loaded, loaded_info = F.load_trained(tmp_path / "final")
    assert fam is M.FAMILY and loaded_info == {**info, "family": "retinanet"}
    assert (tmp_path / "final" / "label_map.pbtxt").read_text() == (sample_records / "label_map.pbtxt").read_text()
    images = tf.random.uniform((2, SIZE, SIZE, 3), 0, 255, seed=4)
    a, b = M.detect(tiny, images), M.detect(loaded, images)
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-5)


def test_label_map_must_be_contiguous(tmp_path):
    (tmp_path / "label_map.pbtxt").write_text("item { id: 1 name: 'a' }\nitem { id: 3 name: 'b' }\n")
    with pytest.raises(F.ModelError, match="without gaps"):
        F.load_label_map(tmp_path)


def test_frozen_batch_norms_keep_their_statistics_in_training(tiny_cfg):
    images = tf.random.uniform([2, SIZE, SIZE, 3], 0, 255)
    for freeze in (False, True):
        detector = M.FAMILY.build(OmegaConf.merge(tiny_cfg, {"freeze_batch_norm": freeze}), 37, None).model
        encoder = detector.backbone.image_encoder
        norms = [layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all(bool(layer.trainable_weights) != freeze for layer in norms)
        trained = encoder(M.preprocess(detector, images), training=True)
        inferred = encoder(M.preprocess(detector, images), training=False)
        same = np.allclose(trained, inferred, atol=1e-5)
        assert same == freeze
