"""A D-FINE training step with HGNetV2's depthwise convolutions on TensorFlow's depthwise kernel (what the
``dfine`` family builds: ``NativeDepthwiseConv2D``) against the same model and weights with Keras' own
grouped convolution (the baseline, in the same process: Keras runs each one as an XLA function of its own).

Two architectures: ``dfine_tiny`` (128 px, batch 16, the learning test's) and ``dfine_small``'s preset
architecture (``benchmarks.standin_dfine``, 640 px, batch 2), both for the 37 Pets classes, on random
images with one random box each: the step's work does not depend on the pixels. Median seconds of
``--steps`` ``train_on_batch`` steps after a first, tracing one; the ratio is baseline / native.

    python -m benchmarks.dfine_depthwise [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import standin_dfine
from detkit.config import load_config
from detkit.models import dfine
from detkit.train.optimizer import make_optimizer, make_schedule

CLASSES = 37


def tiny_model():
    cfg = load_config(overrides=["dataset=sample", "model=dfine_tiny"])
    return dfine.FAMILY.build(cfg.model, CLASSES, None).model, cfg, 16


def small_model():
    import keras

    cfg = load_config(overrides=["dataset=sample", "model=dfine_small"])
    backbone = standin_dfine.build("dfine_small_obj2coco").backbone
    config = {**backbone.get_config(), "backbone": keras.saving.serialize_keras_object(backbone.backbone)}
    model = dfine.DFine(CLASSES, backbone_config=config, scale=[1 / 255], offset=[0.0],
                        **dfine.model_settings(cfg.model))
    return dfine.FAMILY.built(model), cfg, 2


def with_kerass_grouped_convolutions(model):
    """A copy of ``model`` (same weights) whose depthwise convolutions run as Keras runs them."""
    import keras

    copy = dfine.FAMILY.built(dfine.DFine(**{k: v for k, v in model.get_config().items()
                                            if k not in ("name", "trainable", "dtype")}))
    for layer in copy._flatten_layers():
        if isinstance(layer, dfine.NativeDepthwiseConv2D):
            layer.__class__ = keras.layers.Conv2D
    copy.set_weights(model.get_weights())
    return copy


def step_seconds(model, cfg, batch: int, steps: int) -> tuple[float, float]:
    """The first (tracing) step's seconds and the median of ``steps`` more."""
    import tensorflow as tf

    t = cfg.train
    dfine.FAMILY.compile(model, make_optimizer(t, make_schedule(t)), t, "auto")
    size = model.image_size
    images = tf.random.stateless_uniform((batch, size, size, 3), (1, 2), 0, 255)
    corner = tf.random.stateless_uniform((batch, 1, 2), (3, 4), 0.1, 0.5)
    boxes = tf.concat([corner, corner + 0.4], -1)
    labels = tf.random.stateless_uniform((batch, 1), (5, 6), 0, CLASSES, tf.int32)
    made = [dfine.FAMILY.training_targets(boxes[i], tf.cast(labels[i], tf.float32), size) for i in range(batch)]
    targets = {key: tf.stack([m[key] for m in made]) for key in ("boxes", "labels")}
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model.train_on_batch(images, targets)
        timings.append(time.perf_counter() - start)
    return timings[0], statistics.median(timings[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print("\nD-FINE depthwise convolutions: train step seconds, TensorFlow's depthwise kernel against "
          "Keras' grouped convolution (XLA)")
    for name, make in (("dfine_tiny", tiny_model), ("dfine_small", small_model)):
        native, cfg, batch = make()
        adopted = sum(isinstance(layer, dfine.NativeDepthwiseConv2D) for layer in native._flatten_layers())
        baseline = with_kerass_grouped_convolutions(native)
        first_base, base = step_seconds(baseline, cfg, batch, args.steps)
        first_native, fast = step_seconds(native, cfg, batch, args.steps)
        print(f"  {name} ({native.image_size} px, batch {batch}, {adopted} depthwise layers): "
              f"Keras grouped {base:.3f} s a step (first {first_base:.1f} s), native depthwise {fast:.3f} s "
              f"(first {first_native:.1f} s): {base / fast:.2f}x")


if __name__ == "__main__":
    main()
