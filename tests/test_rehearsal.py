"""`make rehearsal` runs the committed default run, whatever the workspace's config holds."""

from __future__ import annotations

import subprocess

import pytest
from omegaconf import OmegaConf

from benchmarks.rehearsal import RehearsalError, check_defaults, default_run_copy, effective_config
from harness.repo_copy import make_repo_copy


def committed(repo, rel: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=repo, check=True, capture_output=True).stdout


def test_after_the_demo_the_rehearsal_copy_holds_the_committed_config_and_the_working_code(tmp_path):
    workspace = make_repo_copy(tmp_path / "workspace")
    # What `make demo` leaves behind: its selection in params.yaml; and a user's edits in conf/ and code.
    params = workspace / "params.yaml"
    params.write_text(params.read_text().replace("dataset: oxford_pets", "dataset: sample")
                      .replace("model: retinanet_resnet50", "model: retinanet_tiny"))
    model_file = workspace / "conf" / "model" / "retinanet_resnet50.yaml"
    model_file.write_text(model_file.read_text() + "\n# edited\n")
    (workspace / "conf" / "model" / "mine.yaml").write_text("family: retinanet\n")
    code = workspace / "detkit" / "__init__.py"
    code.write_text(code.read_text() + "\n# work in progress\n")
    with pytest.raises(RehearsalError, match="'dataset': 'sample', 'model': 'retinanet_tiny'"):
        check_defaults(workspace)

    copy = default_run_copy(tmp_path / "copy", workspace)

    check_defaults(copy)
    assert (copy / "params.yaml").read_bytes() == committed(workspace, "params.yaml")
    assert (copy / "conf/model/retinanet_resnet50.yaml").read_bytes() == committed(
        workspace, "conf/model/retinanet_resnet50.yaml")
    assert not (copy / "conf/model/mine.yaml").exists()
    assert (copy / "detkit/__init__.py").read_text().endswith("# work in progress\n")
    assert subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True,
                          check=True).stdout == ""
    # The line the rehearsal prints of what the stages will read: the copy's committed default run.
    assert effective_config(copy).startswith(
        "dataset oxford_pets (2 archives by file:// URL), model retinanet_resnet50 "
        "(family retinanet, 800 px, pretrained ")


def test_another_model_file_runs_with_the_standin_of_its_preset_selected_as_a_user_selects_it(tmp_path):
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    from benchmarks.rehearsal import model_preset, run_overrides
    from benchmarks.standin_preset import STANDINS

    copy = default_run_copy(tmp_path / "copy")
    # Every committed model file either starts from scratch or from a preset that has a stand-in.
    presets = {p.stem: model_preset(copy, p.stem) for p in sorted((copy / "conf" / "model").glob("*.yaml"))}
    assert presets["retinanet_resnet50"] == "retinanet_resnet50_fpn_coco"
    assert presets["dfine_small"] == "dfine_small_obj2coco" and presets["dfine_medium"] == "dfine_medium_obj2coco"
    assert presets["faster_rcnn_resnet101"] == "resnet_101_imagenet" and presets["retinanet_tiny"] is None
    assert {p for p in presets.values() if p} <= set(STANDINS)
    with pytest.raises(RehearsalError, match=r"no committed conf/model/dfine_smal\.yaml \(model files: .*dfine_small"):
        model_preset(copy, "dfine_smal")

    archive = tmp_path / "preset" / "dfine_small_obj2coco.tar.gz"
    overrides = run_overrides("dfine_small", 4, 2, {"archive": str(archive), "sha256": "ab" * 32},
                              ["eval.batch_size=2"])
    for path, group in to_path_overrides(overrides).items():  # what `dvc exp run -S` does with them
        apply_overrides(copy / path, group)

    assert effective_config(copy).startswith(
        "dataset oxford_pets (2 archives by file:// URL), model dfine_small (family dfine, 640 px, pretrained "
        "dfine_small_obj2coco.tar.gz); train.steps 4, batch_size 2, warmup_steps 3, ")
    assert "eval.batch_size 2" in effective_config(copy)
    assert OmegaConf.load(copy / "conf/model/dfine_small.yaml").pretrained_sha256 == "ab" * 32
    assert OmegaConf.load(copy / "params.yaml").model == "dfine_small"
