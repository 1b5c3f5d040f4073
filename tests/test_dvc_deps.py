"""dvc.yaml's dependencies cannot drift from the code: every file a stage's command imports, directly
or through other modules, is covered by one of the stage's ``deps`` (a file, or a folder holding it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.import_graph import REPO_ROOT, closure

DVC_YAML = YAML(typ="safe").load(REPO_ROOT / "dvc.yaml")
# detkit.models.family.family() imports detkit.models.<family> by the model file's name, which no
# import statement shows: a stage that can build or load a model depends on every family module.
FAMILY_FILE = REPO_ROOT / "detkit" / "models" / "family.py"
# Files a stage reads as data rather than imports: the SageMaker job's entry point, packed into the job.
READ = {"train": [REPO_ROOT / "stages" / "sagemaker_entry.py"]}


def stage_files(stage: str) -> set[Path]:
    module = re.search(r"python -m ([\w.]+)", DVC_YAML["stages"][stage]["cmd"]).group(1)
    files = set(closure(REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py")))
    if FAMILY_FILE in files:
        files |= set(FAMILY_FILE.parent.glob("*.py"))
    return files | set(READ.get(stage, []))


def uncovered(stage: str, deps: list[str] | None = None) -> list[str]:
    deps = [REPO_ROOT / d for d in (deps if deps is not None else DVC_YAML["stages"][stage]["deps"])]
    return sorted(str(f.relative_to(REPO_ROOT)) for f in stage_files(stage)
                  if not any(f == d or d in f.parents for d in deps))


@pytest.mark.parametrize("stage", list(DVC_YAML["stages"]))
def test_every_imported_file_is_a_dependency_of_the_stage(stage):
    assert uncovered(stage) == []


def test_a_module_imported_through_another_is_required():
    # stages/tfrecord.py imports detkit.data.annotations, which imports detkit.data.labelmap.
    deps = [d for d in DVC_YAML["stages"]["tfrecord"]["deps"] if d != "detkit/data/labelmap.py"]
    assert uncovered("tfrecord", deps) == ["detkit/data/labelmap.py"]


def test_every_family_module_is_required_where_models_are_loaded():
    deps = [d for d in DVC_YAML["stages"]["export"]["deps"] if d != "detkit/models"]
    assert "detkit/models/retinanet.py" in uncovered("export", deps)
