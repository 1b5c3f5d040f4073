"""The detector family interface, and what every stage does with any family (docs/models.md).

A family is one module ``detkit/models/<family>.py`` defining ``FAMILY``, an instance of a
``Family`` subclass; the model file ``conf/model/<name>.yaml`` names it (``family: retinanet``).
The stages, the training loop, validation, eval, the export signatures and serving call only
what is here, so they never name a family.

The contract between the pipeline and a family:

- Images reach a model stretched to its square input (``image_size`` x ``image_size``, aspect
  not kept, ``detkit.data.pipeline.resize_image``), float32 pixel values in [0, 255]; the model
  normalises them itself. Normalised box coordinates are therefore the same in the original and
  the model image.
- Training is Keras' own: ``compile`` (the family's loss) and ``fit`` over
  ``(images, training_targets(...))`` batches; checkpoints are ``save_weights`` / ``load_weights``
  (optimizer state included), so resume, ``tf.distribute`` and mixed precision work alike
  (mixed precision where the family's train step can be built in float16: ``Family.mixed_float16``).
- ``detect`` turns resized images into the TF Object Detection API's detections, for any batch
  size: eval, validation during training and every export signature run the same function.
- Classes: the model's are 0-based; label-map ids (``label_map.pbtxt``) are 1-based
  (``LABEL_OFFSET``).

A trained model is a folder (``save_trained``): the family's own files plus ``detkit.json``
(family, model name, image size, class count, detection settings, training step) and a copy of
``label_map.pbtxt``; ``load_trained`` reads any family's.
"""

from __future__ import annotations

import importlib
import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from detkit.data.labelmap import LabelMapError, read_label_map

LABEL_OFFSET = 1  # label-map id = model class + LABEL_OFFSET
INFO_FILE = "detkit.json"
LABEL_MAP_FILE = "label_map.pbtxt"
OUTPUT_KEYS = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")


class ModelError(ValueError):
    """The model cannot be built or loaded: names the file or key to fix."""


@dataclass
class Built:
    """A model ready to train, and what it kept of its pretrained weights."""

    model: Any
    kept: int = 0  # pretrained tensors loaded into the model
    total: int = 0  # tensors of the model
    new: list[str] = field(default_factory=list)  # names of the tensors that start fresh

    def describe(self) -> str:
        if not self.kept:
            return f"all {self.total} tensors start from random values (no pretrained weights)"
        shown = ", ".join(self.new[:6]) + (f" and {len(self.new) - 6} more" if len(self.new) > 6 else "")
        return (f"kept {self.kept} of {self.total} tensors from the pretrained weights"
                + (f"; new: {shown}" if self.new else ""))


class Family(ABC):
    """One detector family. Every method but ``build`` works on a model that ``build`` or ``load`` made."""

    name: str
    # Whether the train step can be built under Keras' mixed_float16 policy. Where it cannot,
    # ``train.mixed_precision: auto`` trains in float32 and ``true`` is refused before any work.
    mixed_float16: bool = True

    @abstractmethod
    def build(self, m, num_classes: int, pretrained: Path | None) -> Built:
        """A fresh model for ``num_classes`` classes from the model file ``m``, starting from the
        pretrained stage's preset folder ``pretrained`` (None: random weights)."""

    @abstractmethod
    def training_targets(self, boxes, labels, size: int) -> Any:
        """One example's ``fit`` target, inside tf.data: ``boxes`` float32 [R, 4] normalised
        [ymin, xmin, ymax, xmax], ``labels`` float32 [R] 0-based; padding rows hold -1 in both."""

    @abstractmethod
    def compile(self, model, optimizer, t, jit_compile) -> None:
        """``model.compile`` with the family's loss; ``t`` is ``train.*`` (``class_loss_weight``)."""

    @abstractmethod
    def loss_parts(self, logs: dict[str, float]) -> dict[str, float]:
        """Keras' logs of a stop -> the train log's ``loss``, ``box_loss`` and ``class_loss``."""

    @abstractmethod
    def detect(self, model, images, detection: dict[str, Any], max_detections: int | None = None) -> dict[str, Any]:
        """Resized images float32 [B, S, S, 3] in [0, 255] -> the TF OD API outputs (``OUTPUT_KEYS``):
        boxes [B, M, 4] normalised yxyx in [0, 1], 1-based classes [B, M], scores [B, M] sorted
        descending, num_detections [B], all float32, zeros past num_detections.
        M = ``max_detections`` or ``detection["max_detections"]``."""

    @abstractmethod
    def save(self, model, folder: Path) -> None:
        """Write the trained model's files into ``folder`` (exists, empty)."""

    @abstractmethod
    def load(self, folder: Path):
        """The model ``save`` wrote, float32, exactly as saved."""


class KerasModelFamily(Family):
    """A family whose model is our own ``keras.Model`` subclass (``model_class``), rebuilt from its
    ``get_config()``: it decodes with its own ``detections`` method, and is saved as ``config_file``
    (that config as JSON) and ``model.weights.h5``. Its train step holds NMS, top-k or a matcher's
    loop, which XLA does not compile, so ``train.jit_compile: auto`` means off."""

    model_class: type
    config_file: str
    weights_file = "model.weights.h5"

    def build(self, m, num_classes: int, pretrained: Path | None) -> Built:
        if pretrained is not None:
            return self.from_preset(m, num_classes, find_preset(pretrained))
        if m.architecture is None:
            raise ModelError(f"conf/model/{m.name}.yaml: 'pretrained: none' builds from 'architecture', "
                             "which is null; set the architecture keys or a preset in 'pretrained'")
        model = self.built(self.from_architecture(m, num_classes, OmegaConf.to_container(m.architecture,
                                                                                         resolve=True)))
        return Built(model, total=len(model.weights))

    @abstractmethod
    def from_preset(self, m, num_classes: int, preset: Path) -> Built:
        """A model for ``num_classes`` from the KerasHub preset folder ``preset``, and what it kept of it."""

    @abstractmethod
    def from_architecture(self, m, num_classes: int, architecture: dict[str, Any]):
        """A model (not yet built) for ``num_classes`` from the model file's ``architecture`` as plain values."""

    def built(self, model):
        """``model`` called once on a blank image, so every weight exists.

        Through ``tf.function``: called eagerly, Keras runs each grouped convolution of a model in a new
        XLA function, and TensorFlow warns of "retracing" on the console."""
        import tensorflow as tf

        tf.function(model)(tf.zeros((1, model.image_size, model.image_size, 3)))
        return model

    def compile(self, model, optimizer, t, jit_compile) -> None:
        model.class_loss_weight = float(t.class_loss_weight)
        model.compile(optimizer=optimizer, jit_compile=False if str(jit_compile).lower() == "auto" else jit_compile)

    def detect(self, model, images, detection: dict[str, Any], max_detections: int | None = None) -> dict[str, Any]:
        return model.detections(images, detection, int(max_detections or detection["max_detections"]))

    def save(self, model, folder: Path) -> None:
        config = {k: v for k, v in model.get_config().items() if k not in ("name", "trainable", "dtype")}
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.config_file).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.save_weights(str(Path(folder) / self.weights_file))

    def load(self, folder: Path):
        try:
            config = json.loads((Path(folder) / self.config_file).read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder}/{self.config_file}: cannot read the {self.name} model config: {exc}") from exc
        model = self.built(self.model_class(**config, dtype="float32"))
        model.load_weights(str(Path(folder) / self.weights_file))
        return model


def per_channel(value, default: float) -> list[float]:
    """A KerasHub image converter's ``scale`` or ``offset`` (None, a number or one per channel) as a list."""
    if value is None:
        return [default]
    return [float(v) for v in np.ravel(np.asarray(value, dtype=np.float64))]


def family(name: str) -> Family:
    """The family of a model file's ``family:`` key: ``detkit.models.<name>.FAMILY``."""
    try:
        module = importlib.import_module(f"detkit.models.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"detkit.models.{name}":
            raise
        known = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in ("__init__", "family"))
        raise ModelError(f"model family '{name}': no module detkit/models/{name}.py "
                         f"(known: {', '.join(known)})") from None
    return module.FAMILY


def build(m, num_classes: int, pretrained: Path | None) -> Built:
    """A fresh model as the model file ``m`` says (its family's ``build``)."""
    return family(m.family).build(m, num_classes, pretrained if m.pretrained != "none" else None)


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


def find_preset(folder: Path) -> Path:
    """The KerasHub preset folder in ``folder`` (itself, or its only child holding config.json)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    children = sorted(p.parent for p in folder.glob("*/config.json")) if folder.is_dir() else []
    if len(children) == 1:
        return children[0]
    raise ModelError(f"{folder}: no KerasHub preset found (a folder with config.json and weights); "
                     "run the 'pretrained' stage")


def save_trained(fam: Family, model, folder: Path, info: dict[str, Any], label_map_path: Path | None = None) -> None:
    """The trained model (``fam.save``) + ``detkit.json`` (``info``, with the family) + the label map."""
    folder = Path(folder)
    fam.save(model, folder)
    (folder / INFO_FILE).write_text(json.dumps({**info, "family": fam.name}, indent=2, sort_keys=True) + "\n")
    if label_map_path is not None:
        shutil.copyfile(label_map_path, folder / LABEL_MAP_FILE)


def load_trained(folder: Path) -> tuple[Family, Any, dict[str, Any]]:
    """``(family, model, info)`` from a folder written by ``save_trained`` (``models/checkpoints/final``)."""
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file():
        raise ModelError(f"{folder}: not a trained model folder ({INFO_FILE} missing); run the train stage")
    info = json.loads((folder / INFO_FILE).read_text())
    fam = family(info["family"])
    return fam, fam.load(folder), info


def detection_function(fam: Family, model, size: int, detection: dict[str, Any], max_detections: int | None = None):
    """``fam.detect`` compiled into one graph, for batches of resized images float32 [B, size, size, 3].

    Graph execution frees each layer's activations once they are consumed; an eager call of a
    Keras model keeps them all until it returns: for ResNet-50 at 800 px about 2 GB per image,
    so eval's batch of 16 did not fit in 24 GB (in a graph: about 1.4 GB at batch 2).
    """
    import tensorflow as tf

    return tf.function(lambda images: fam.detect(model, images, detection, max_detections),
                       input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
