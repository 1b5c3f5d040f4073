"""`make rehearsal` runs the committed default run, whatever the workspace's config holds."""

from __future__ import annotations

import subprocess

import pytest

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
