"""The package stage: a docker build context with everything the Dockerfile copies, and a
model.tar.gz in the layout AWS's TF Serving containers look for, with their request handler."""

from __future__ import annotations

import re
import shutil
import tarfile

import pytest

from detkit.config import load_config
from harness.serving import REPO_ROOT
from stages import package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packaged(demo_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("package")
    outputs = {"context": out / "serving", "archive": out / "model.tar.gz"}
    manifest = package.run(load_config(), {"export": demo_repo / "models" / "export", "serving": REPO_ROOT / "serving"},
                           outputs)
    return outputs, manifest


def test_model_tar_gz_has_the_tf_serving_layout(packaged, demo_repo):
    outputs, manifest = packaged
    with tarfile.open(outputs["archive"]) as tar:
        names = tar.getnames()
        handler = tar.extractfile("code/inference.py").read()
    assert "pet_object_detection/1/saved_model.pb" in names
    assert "pet_object_detection/1/variables/variables.index" in names
    assert {n.split("/")[0] for n in names} == {"pet_object_detection", "code"}
    model = [n for n in names if n.startswith("pet_object_detection/")]
    assert {n.split("/")[1] for n in model} == {"1"}
    export = demo_repo / "models" / "export" / "pet_object_detection" / "1"
    assert sorted(n.split("/", 2)[2] for n in model if n.count("/") >= 2) == \
        sorted(str(p.relative_to(export)) for p in export.rglob("*"))
    # The handler AWS's TF Serving images load from code/: the one in serving/, nothing else there.
    assert [n for n in names if n.startswith("code")] == ["code", "code/inference.py"]
    assert handler == (REPO_ROOT / "serving" / "inference.py").read_bytes()
    assert manifest["export_check_passed"] and manifest["version"] == 1


def test_archive_is_reproducible(packaged, demo_repo, tmp_path):
    outputs, _ = packaged
    again = {"context": tmp_path / "serving", "archive": tmp_path / "model.tar.gz"}
    package.run(load_config(), {"export": demo_repo / "models" / "export", "serving": REPO_ROOT / "serving"}, again)
    assert again["archive"].read_bytes() == outputs["archive"].read_bytes()


def test_context_holds_everything_the_dockerfile_copies(packaged):
    outputs, _ = packaged
    context = outputs["context"]
    dockerfile = (context / "Dockerfile").read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)
               for src in line.split()[:-1] if not src.startswith("--")]
    assert sources == ["entrypoint.sh", "render-nginx-conf.sh", "nginx.conf.template", "invocations.js", "model/"]
    for source in sources:
        assert (context / source).exists(), source
    assert (context / "model" / "pet_object_detection" / "1" / "saved_model.pb").is_file()
    assert (context / "entrypoint.sh").stat().st_mode & 0o111


def test_nothing_to_package_is_a_clear_error(tmp_path):
    with pytest.raises(package.PackageError, match="no exported version; run the export stage"):
        package.run(load_config(), {"export": tmp_path, "serving": REPO_ROOT / "serving"},
                    {"context": tmp_path / "c", "archive": tmp_path / "m.tar.gz"})
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.tar.gz").exists()


def test_a_serving_folder_without_the_handler_is_a_clear_error(demo_repo, tmp_path):
    serving = tmp_path / "serving"
    shutil.copytree(REPO_ROOT / "serving", serving, ignore=shutil.ignore_patterns("inference.py"))
    with pytest.raises(package.PackageError, match=r"serving: missing inference.py \(the Dockerfile and model.tar.gz"):
        package.run(load_config(), {"export": demo_repo / "models" / "export", "serving": serving},
                    {"context": tmp_path / "c", "archive": tmp_path / "m.tar.gz"})
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.tar.gz").exists()
