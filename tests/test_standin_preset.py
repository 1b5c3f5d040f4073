"""benchmarks.standin_preset: each model file's KerasHub preset has a random-weight stand-in of
exactly its architecture (parameter count = the installed preset metadata's), which the
pretrained stage takes as an archive and the family builds from as from the real preset."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks import standin_preset
from detkit.config import load_config
from harness.repo_copy import REPO_ROOT


def model_file_presets() -> dict[str, str]:
    """model file -> the preset its ``pretrained`` names (model files starting from scratch left out)."""
    sources = {p.stem: str(OmegaConf.load(p).pretrained) for p in sorted((REPO_ROOT / "conf" / "model").glob("*.yaml"))}
    return {model: standin_preset.preset_name(source) for model, source in sources.items() if source != "none"}


def test_preset_names_are_read_from_hub_handles_and_archive_paths():
    assert standin_preset.preset_name("kaggle://keras/d-fine/keras/dfine_small_obj2coco/1") == "dfine_small_obj2coco"
    assert standin_preset.preset_name("kaggle://keras/resnetv1/keras/resnet_101_imagenet") == "resnet_101_imagenet"
    assert standin_preset.preset_name("hf://keras/retinanet_resnet50_fpn_coco") == "retinanet_resnet50_fpn_coco"
    assert standin_preset.preset_name("file:///tmp/p/resnet_101_imagenet.tar.gz") == "resnet_101_imagenet"
    with pytest.raises(standin_preset.StandInError, match="no stand-in for the preset 'resnet_50_imagenet'"):
        standin_preset.builder("resnet_50_imagenet")


def test_every_model_file_preset_has_a_standin():
    presets = model_file_presets()
    assert presets == {"dfine_medium": "dfine_medium_obj2coco", "dfine_small": "dfine_small_obj2coco",
                       "faster_rcnn_resnet101": "resnet_101_imagenet",
                       "retinanet_resnet50": "retinanet_resnet50_fpn_coco"}
    assert set(presets.values()) <= set(standin_preset.STANDINS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(set(model_file_presets().values())))
def test_standin_has_the_parameter_count_of_the_installed_preset_metadata(preset):
    checks = standin_preset.verify(preset, standin_preset.build(preset))
    expected = {"dfine_medium_obj2coco": 19_621_160, "dfine_small_obj2coco": 10_329_321,
                "resnet_101_imagenet": 42_605_504, "retinanet_resnet50_fpn_coco": 34_121_239}[preset]
    assert checks["counted_parameters"] == checks["metadata_parameters"] == expected
    if "conversion" in checks:  # the conversion replayed: every variable filled, each once
        assert checks["conversion"]["variables"] == checks["conversion"]["source_tensors"]


@pytest.mark.slow
def test_standin_changed_away_from_the_preset_is_refused(monkeypatch):
    from benchmarks import standin_dfine

    monkeypatch.setitem(standin_dfine.DECODER, "lqe_hidden_dim", 32)  # HF DFineConfig's is 64
    task = standin_preset.build("dfine_small_obj2coco")
    with pytest.raises(AssertionError, match=r"has [\d,]+ parameters, the preset dfine_small_obj2coco has 10,329,321"):
        standin_preset.verify("dfine_small_obj2coco", task)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """model file -> (the stand-in's info, the pretrained stage's output folder from its archive), once each."""
    from stages import pretrained

    done: dict[str, tuple[dict, Path]] = {}

    def run(model: str) -> tuple[dict, Path]:
        if model not in done:
            root = tmp_path_factory.mktemp(model)
            info = standin_preset.write(model_file_presets()[model], root)
            cfg = OmegaConf.merge(load_config(overrides=[f"model={model}"]),
                                  {"model": {"pretrained": info["archive"], "pretrained_sha256": info["sha256"]}})
            summary = pretrained.run(cfg, {"cache": root / "cache"}, {"pretrained": root / "out"})
            assert summary["kind"] == "archive" and summary["class"] == info["task"]
            assert summary["parameters"] == info["parameters"]
            done[model] = info, root / "out"
        return done[model]

    return run


IMAGENET_SCALE = [1 / 255 / 0.229, 1 / 255 / 0.224, 1 / 255 / 0.225]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "scale"), [("dfine_small", 1 / 255), ("faster_rcnn_resnet101", IMAGENET_SCALE)],
                         ids=["dfine_small", "faster_rcnn_resnet101"])
def test_pretrained_stage_takes_the_standin_archive_with_its_image_converter(staged, model, scale):
    import keras_hub

    _, out = staged(model)
    assert keras_hub.layers.ImageConverter.from_preset(str(out)).scale == pytest.approx(scale)


@pytest.mark.slow
def test_dfine_family_builds_from_the_standin_with_its_input_scaling(staged):
    from detkit.models import family

    info, out = staged("dfine_small")
    built = family.build(load_config(overrides=["model=dfine_small"]).model, 3, out)
    assert built.model.scale == pytest.approx([1 / 255]) and built.model.offset == [0.0]
    # Every tensor but the class heads' (sized by the class count) comes from the stand-in.
    assert built.kept > 0 and all("class_embed" in name or "score_head" in name for name in built.new)
