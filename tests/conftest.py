"""Shared fixtures: the real composed config, shrunk for tests, and the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from detkit.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stages resolve params.yaml and conf/ from DVC_ROOT, as under `dvc repro`.
os.environ["DVC_ROOT"] = str(REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# The groups that take minutes, longest first (--durations on 2 cores). `make test` passes xdist's
# --no-loadscope-reorder, so groups reach the workers in collection order: starting the longest first
# keeps both workers busy to the end (by default xdist sorts groups by test count, which sent these
# few-test groups last and left one worker idle for minutes). Only speed depends on this list.
LONGEST_FIRST = (
    "demo",
    "tests/test_dfine.py::test_tiny_learns_on_the_sample_and_goes_through_eval_and_export",
    "tests/test_dvc_pipeline.py::test_experiments_of_three_families_show_up_in_dvc_exp_show_compare_and_mlflow",
    "test_dvc_pipeline",
    "test_sagemaker_training",
    "tests/test_faster_rcnn.py::test_tiny_learns_on_the_sample_and_goes_through_eval_and_export",
    "tests/test_distribute.py::test_mixed_precision_and_mirrored_strategy_train_resume_evaluate_and_export_float32",
    "test_dfine",
    "tests/test_distribute.py::test_two_workers_train_alike_only_the_chief_writes_and_a_killed_run_resumes",
)


def xdist_group(item) -> str:
    """``demo`` for every test that needs the demo's run, so `make demo` runs once; the module's name
    for a test that uses a fixture the module's tests share, so it is built once; otherwise the test's
    own id, so a module's independent tests can run on both workers."""
    if "demo_run" in item.fixturenames:
        return "demo"
    fixtures = item._fixtureinfo.name2fixturedefs  # pytest's resolved fixtures of the test (no public API)
    if any(defs[-1].scope in ("module", "class") for defs in fixtures.values()):
        return item.module.__name__
    return item.nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """With pytest-xdist (``make test`` runs two workers, ``--dist loadgroup``): tests grouped as
    ``xdist_group`` says, the longest groups first; a group's tests keep their order."""
    groups = {item: xdist_group(item) for item in items}
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    rank = {group: index for index, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))


@pytest.fixture
def cfg() -> DictConfig:
    """The real params.yaml + conf/ groups, on the embedded sample dataset."""
    return load_config(overrides=["dataset=sample"])


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> Path:
    """The embedded sample, downloaded (from its committed archives) and extracted."""
    from stages import download

    root = tmp_path_factory.mktemp("sample")
    download.run(load_config(overrides=["dataset=sample"]), {"cache": root / "cache"}, {"raw": root / "raw"})
    return root / "raw"


@pytest.fixture(scope="session")
def sample_records(sample_raw) -> Path:
    """TFRecords of the embedded sample, as the tfrecord stage writes them."""
    from stages import tfrecord

    out = sample_raw.parent / "records"
    tfrecord.run(load_config(overrides=["dataset=sample"]), {"raw": sample_raw}, {"records": out})
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`make demo` in a fresh copy of the repo, from a user's shell (no venv on PATH): the whole
    pipeline on the sample, as users run it. Returns the copy and the finished command."""
    import shutil
    import subprocess

    from harness.repo_copy import make, make_repo_copy

    finished = os.environ.get("DETKIT_TEST_DEMO_REPO")
    if finished:  # iterating on later tests: a copy of a demo run made before (test_demo needs a real one)
        root = Path(shutil.copytree(finished, tmp_path_factory.mktemp("demo") / "repo", symlinks=True))
        return root, subprocess.CompletedProcess(["make", "demo"], 0, "", "")
    root = make_repo_copy(tmp_path_factory.mktemp("demo"))
    result = make(root, "demo")
    assert result.returncode == 0, f"make demo failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return root, result


@pytest.fixture(scope="session")
def demo_repo(demo_run) -> Path:
    return demo_run[0]


@pytest.fixture(scope="session")
def version_1(demo_repo) -> Path:
    """The demo's export (its first version)."""
    return demo_repo / "models" / "export" / "pet_object_detection" / "1"


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> its sha256."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def reexported(demo_repo, tmp_path_factory):
    """The demo's export folder copied, then exported again (version 2) with both extra signatures
    and 20 detections per image: the folder, version 1's digest before, the stage's summary."""
    import shutil

    from stages import export

    out = tmp_path_factory.mktemp("export") / "export"
    shutil.copytree(demo_repo / "models" / "export", out)
    before = tree_digest(out / "pet_object_detection" / "1")
    cfg = load_config(overrides=["dataset=sample", "export.extra_signatures=[image_tensor,tf_example]",
                                 "export.max_detections=20"])
    summary = export.run(cfg, {"checkpoints": demo_repo / "models" / "checkpoints",
                               "records": demo_repo / "data" / "records"}, {"export": out})
    return out, before, summary


@pytest.fixture(scope="session")
def served(demo_repo):
    """The demo's export served as `make serve` does: entrypoint + nginx + TF Serving stand-in."""
    from harness.serving import ServingStack

    with ServingStack(demo_repo / "models" / "export") as stack:
        yield stack


@pytest.fixture(scope="session")
def val_examples(demo_repo) -> list[dict]:
    """The demo's val examples, parsed: encoded image, size, true boxes and labels."""
    import tensorflow as tf

    from detkit.data.pipeline import shard_files
    from detkit.data.records import feature_spec

    examples = []
    for serialized in tf.data.TFRecordDataset(shard_files(demo_repo / "data" / "records", "val")):
        ex = tf.io.parse_single_example(serialized, feature_spec())
        dense = {k: tf.sparse.to_dense(v).numpy() if isinstance(v, tf.SparseTensor) else v.numpy()
                 for k, v in ex.items()}
        examples.append({
            "encoded": dense["image/encoded"],
            "filename": dense["image/filename"].decode(),
            "boxes": [[ymin, xmin, ymax, xmax] for ymin, xmin, ymax, xmax in zip(
                dense["image/object/bbox/ymin"], dense["image/object/bbox/xmin"],
                dense["image/object/bbox/ymax"], dense["image/object/bbox/xmax"])],
            "labels": dense["image/object/class/label"].tolist(),
        })
    return examples
