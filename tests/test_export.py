"""The export stage on the model that `make demo` trained: TF Serving layout, the export check's
report, versions, extra signatures, and a failed check: the stage fails, the version stays,
marked failed, and deploy refuses it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from detkit.cloud import deploy
from detkit.config import load_config
from detkit.data.labelmap import read_label_map
from detkit.serve import export_check, signatures
from stages import export, package
from tests.conftest import tree_digest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def stage_inputs(demo_repo: Path) -> dict[str, Path]:
    return {"checkpoints": demo_repo / "models" / "checkpoints", "records": demo_repo / "data" / "records"}


def test_layout_is_tf_servings_with_label_map_and_passed_check(demo_repo, version_1):
    assert (version_1 / "saved_model.pb").is_file() and (version_1 / "variables" / "variables.index").is_file()
    assert read_label_map(version_1 / "assets.extra" / "label_map.pbtxt") == \
        read_label_map(demo_repo / "data" / "records" / "label_map.pbtxt")
    check = json.loads((version_1 / "assets.extra" / "export_check.json").read_text())
    assert check["passed"] and check["images"] == 16 and check["version"] == 1
    assert check["matched"] > 0 and check["mismatched"] == 0
    assert check["near_tie_share"] <= check["max_near_tie_share"] == export_check.MAX_NEAR_TIE_SHARE
    assert max(check["max_abs_difference"].values()) <= check["tolerance"] == 1e-3
    assert check["max_image_pixels"] == 25_000_000 and check["model_name"] == "pet_object_detection"


def test_export_check_json_has_the_fields_docs_export_md_shows(version_1):
    text = (ROOT / "docs" / "export.md").read_text()
    section = text[text.index("## The export check"):]
    shown = section[section.index("```\n{"):section.index("\n}\n```")]
    documented = set(re.findall(r'^  "(\w+)":', shown, re.M))
    check = json.loads((version_1 / "assets.extra" / "export_check.json").read_text())
    assert documented == set(check)
    assert f'"max_near_tie_share": {export_check.MAX_NEAR_TIE_SHARE},' in shown
    assert f"at most {export_check.MAX_NEAR_TIE_SHARE:.0%} of both runs' detections" in " ".join(section.split())


def test_reexport_adds_a_version_and_leaves_the_old_one(reexported):
    out, before, summary = reexported
    assert summary["version"] == 2 and summary["check"]["passed"]
    assert tree_digest(out / "pet_object_detection" / "1") == before
    # Each exported signature was checked against the contract, at the new max_detections.
    checked = summary["check"]["signatures"]
    assert sorted(checked) == ["image_tensor", "serving_default", "tf_example"]
    assert all(entry["matches_contract"] for entry in checked.values())
    shown = {name: entry["saved_model_cli"] for name, entry in checked.items()}  # as saved_model_cli printed it
    assert shown["serving_default"]["outputs"]["detection_boxes"] == ["DT_FLOAT", "(-1, 20, 4)"]
    assert shown["image_tensor"]["inputs"] == {"inputs": ["DT_UINT8", "(1, -1, -1, 3)"]}
    assert shown["image_tensor"]["outputs"]["detection_scores"] == ["DT_FLOAT", "(1, 20)"]
    assert shown["tf_example"]["inputs"] == {"inputs": ["DT_STRING", "(-1)"]}


def test_an_existing_version_is_never_overwritten(reexported, demo_repo):
    out, _, _ = reexported
    before = tree_digest(out)
    cfg = load_config(overrides=["dataset=sample", "export.version=1"])
    with pytest.raises(export.ExportError, match="version 1 exists and is never overwritten"):
        export.run(cfg, stage_inputs(demo_repo), {"export": out})
    assert tree_digest(out) == before


def test_a_failed_check_fails_the_stage_keeps_the_version_marked_failed_and_deploy_refuses_it(
        demo_repo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    shutil.copytree(demo_repo / "models" / "export", out)
    write = signatures.write_savedmodel

    def drifting(fam, model, size, detection, *args):  # an export that drops what eval measured below 0.5
        write(fam, model, size, {**detection, "score_threshold": 0.5}, *args)

    monkeypatch.setattr(signatures, "write_savedmodel", drifting)
    inputs = stage_inputs(demo_repo)
    status = export.main(["--checkpoints", str(inputs["checkpoints"]), "--records", str(inputs["records"]),
                          "--out", str(out), "dataset=sample", "export.check_images=4", "export.version=7"])
    printed = capsys.readouterr()
    version = out / "pet_object_detection" / "7"  # the number asked for
    assert status == 2
    assert printed.err.splitlines() == [f"error: {version / 'assets.extra' / 'export_check.json'}: the export "
                                        "check failed; the version is kept for inspection and make deploy refuses it"]
    assert re.search(r"export check FAILED on 4 val images: \d+ detections match .*, \d+ near ties \([\d.]+% of the "
                     r"detections, at most 5%\), [1-9]\d* mismatched", printed.out), printed.out
    check = json.loads((version / "assets.extra" / "export_check.json").read_text())
    assert check["passed"] is False and check["mismatched"] > 0 and check["version"] == 7
    assert (version / "saved_model.pb").is_file()

    cfg = load_config(overrides=["dataset=sample"])
    context, archive = tmp_path / "build" / "serving", tmp_path / "build" / "model.tar.gz"
    manifest = package.run(cfg, {"export": out, "serving": ROOT / "serving"}, {"context": context, "archive": archive})
    assert manifest["version"] == 7 and manifest["export_check_passed"] is False  # the newest
    settings = deploy.Settings(cfg.deploy, cfg.export.model_name, cfg.model.serving_gib, context,
                               demo_repo / "metrics" / "eval.json", archive)
    with pytest.raises(deploy.DeployError, match=r"refused: the export check of pet_object_detection version 7 "
                                                 r"failed \(see .*/7/assets.extra/export_check.json\)"):
        deploy.quality_gate(settings)
