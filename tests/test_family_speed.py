"""`make bench`'s per-family figures cover every real model file, the default run's first."""

from __future__ import annotations

import shutil

from benchmarks.family_speed import real_models
from harness.repo_copy import REPO_ROOT


def test_every_model_file_that_starts_from_a_preset_is_measured_the_default_run_first(tmp_path):
    (tmp_path / "conf").mkdir()
    shutil.copytree(REPO_ROOT / "conf" / "model", tmp_path / "conf" / "model")
    (tmp_path / "params.yaml").write_text("model: faster_rcnn_resnet101\n")
    # A user's new file on a preset that has a stand-in is measured with the others.
    mine = (REPO_ROOT / "conf" / "model" / "dfine_small.yaml").read_text().replace("dfine_small_obj2coco",
                                                                                   "dfine_small_coco")
    (tmp_path / "conf" / "model" / "my_dfine.yaml").write_text(mine)

    assert real_models(tmp_path) == ["faster_rcnn_resnet101", "dfine_medium", "dfine_small", "my_dfine",
                                     "retinanet_resnet50"]
