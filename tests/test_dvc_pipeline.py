"""dvc.yaml end to end in a throwaway copy of the repo: stages run under `dvc repro`, re-run
exactly when their inputs change, and `dvc exp run` experiments land in `dvc exp show` and
in MLflow with the same metrics; `make compare` and `make mlflow-ui` show them."""

from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest
import requests
from ruamel.yaml import YAML

from harness.httpserver import free_port
from harness.repo_copy import make, make_in_background, make_repo_copy, run

pytestmark = pytest.mark.slow

# Plumbing, not learning: a few steps keep each training run to seconds.
QUICK = {"train.steps": "6", "train.batch_size": "4", "train.checkpoint_every": "3", "train.warmup_steps": "0",
         "eval.num_samples": "2", "export.check_images": "4"}


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def set_params(root, **changes):
    """Edit params.yaml as a user would, comments kept (keys may be dotted: train.steps)."""
    yaml = YAML()
    path = root / "params.yaml"
    params = yaml.load(path)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = params
        for parent in parents:
            node = node[parent]
        assert key in node, dotted
        node[key] = yaml.load(str(value))
    yaml.dump(params, path)


def quick_copy(dest):
    root = make_repo_copy(dest)
    set_params(root, dataset="sample", model="retinanet_tiny", **QUICK)
    run(["git", "commit", "-qam", "quick params"], root)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """One copy for the repro tests, which build on each other's DVC cache (each passes alone too)."""
    return quick_copy(tmp_path_factory.mktemp("repo"))


def test_data_stages_run_once_and_rerun_only_on_their_params(repo):
    first = run(["dvc", "repro", "tfrecord"], repo)
    assert ran(first.stdout) == ["download", "tfrecord"], first.stdout
    assert (repo / "data" / "records" / "stats.json").is_file()
    assert sorted(p.name for p in (repo / "data" / "raw").iterdir()) == ["annotations", "images"]

    second = run(["dvc", "repro", "tfrecord"], repo)
    assert ran(second.stdout) == [], second.stdout

    set_params(repo, **{"split.seed": 7})
    try:
        third = run(["dvc", "repro", "tfrecord"], repo)
        assert ran(third.stdout) == ["tfrecord"], third.stdout
    finally:
        set_params(repo, **{"split.seed": 42})


def test_editing_a_module_a_stage_imports_through_another_makes_the_stage_changed(repo):
    run(["dvc", "repro", "tfrecord"], repo)
    # stages/tfrecord.py -> detkit/data/annotations.py -> detkit/data/labelmap.py
    labelmap = repo / "detkit" / "data" / "labelmap.py"
    original = labelmap.read_text()
    labelmap.write_text(original + "\n# an edit\n")
    try:
        status = run(["dvc", "status", "tfrecord"], repo).stdout
        changed = r"^tfrecord:\s*\n\s+changed deps:\s*\n\s+modified:\s+detkit/data/labelmap.py"
        assert re.search(changed, status, re.M), status
    finally:
        labelmap.write_text(original)
    assert "up to date" in run(["dvc", "status", "tfrecord"], repo).stdout


def test_whole_pipeline_then_a_param_reruns_only_what_depends_on_it(repo):
    first = run(["dvc", "repro"], repo)
    assert {"pretrained", "train", "eval", "export"} <= set(ran(first.stdout)), first.stdout
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    # What a 6-step model scores is not predictable; what this test owns is that DVC's metrics file holds
    # what the eval stage measured of this run: its step, every val image, and the AP50 it printed.
    printed = re.search(r"^eval: (\d+) val images: AP [\d.]+  AP50 ([\d.]+)", first.stdout, re.M)
    assert printed, first.stdout
    assert (metrics["step"], metrics["num_images"], f"{metrics['AP50']:.3f}") == (6, 132, printed[2])
    assert int(printed[1]) == 132
    exports = repo / "models" / "export" / "pet_object_detection"
    assert sorted(p.name for p in exports.iterdir()) == ["1"]

    set_params(repo, **{"train.learning_rate": "0.002"})
    again = run(["dvc", "repro"], repo)
    assert sorted(ran(again.stdout)) == ["eval", "export", "package", "train"], again.stdout
    # The new model is a new version; the old one stays (TF Serving serves the newest).
    assert sorted(p.name for p in exports.iterdir()) == ["1", "2"]

    set_params(repo, **{"export.max_detections": 50})
    try:
        third = run(["dvc", "repro"], repo)
        assert ran(third.stdout) == ["export", "package"], third.stdout
        assert sorted(p.name for p in exports.iterdir()) == ["1", "2", "3"]
    finally:
        set_params(repo, **{"export.max_detections": 100})
    assert ran(run(["dvc", "repro"], repo).stdout) == ["export", "package"]


FAMILY_EXPERIMENTS = {"retinanet-2s": "retinanet_tiny_2s", "dfine": "dfine_tiny", "frcnn": "faster_rcnn_tiny"}


def queue_finished(root, timeout_s: float) -> str:
    """`dvc queue status` once no task is queued or running; the last table it printed."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(["dvc", "queue", "status"], root).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout_s:.0f} s:\n{status}"
        time.sleep(5)


def test_experiments_of_three_families_show_up_in_dvc_exp_show_compare_and_mlflow(tmp_path):
    """Two experiments queued (`dvc exp run --queue`, `dvc queue start`), each run in its own copy, and one
    with the README's `make exp` in the workspace: all land in `dvc exp show`, in the workspace's MLflow
    store (one run each, trained with their own params), in `make compare` and in `make mlflow-ui`.
    The queued two stop at eval: what is compared ends there, and each family's export is held by its
    learning test (test_dfine.py, test_faster_rcnn.py) and RetinaNet's by the whole-pipeline test."""
    repo = quick_copy(tmp_path)
    # A second model is just a second file: the tiny model with two anchor scales, not three.
    tiny = (repo / "conf" / "model" / "retinanet_tiny.yaml").read_text()
    (repo / "conf" / "model" / "retinanet_tiny_2s.yaml").write_text(
        re.sub(r"(?m)^(\s*num_scales:) 3", r"\1 2", tiny, count=1))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "second model"], repo)

    committed_rate = YAML(typ="safe").load((repo / "params.yaml").read_text())["train"]["learning_rate"]
    queued = ("dfine", "frcnn")
    for name in queued:
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"model={FAMILY_EXPERIMENTS[name]}", "eval"], repo)
    run(["dvc", "queue", "start", "-j", "1"], repo)
    try:
        status = queue_finished(repo, timeout_s=480)
    finally:
        run(["dvc", "queue", "stop"], repo, check=False)
    logs = {name: run(["dvc", "queue", "logs", name], repo, check=False).stdout for name in queued}
    for name in queued:
        assert re.search(rf"\b{name}\b.*\bSuccess\b", status), status + logs[name][-4000:]
    assert not (repo / "data").exists() and not (repo / "models").exists()  # each ran in its own copy
    assert "train: dfine_tiny: all 618 tensors start from random values" in logs["dfine"], logs["dfine"][-3000:]
    assert "WARNING:tensorflow" not in logs["dfine"]  # nothing a user cannot act on

    made = make(repo, "exp", "SET=model=retinanet_tiny_2s train.learning_rate=0.004",
                "NAME=retinanet-2s")  # the README's form
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "WARNING:tensorflow" not in made.stdout + made.stderr

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    experiments = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs") or []:
                data = revision["data"]
                experiments[revision.get("name") or data.get("name")] = data
    assert set(FAMILY_EXPERIMENTS) <= set(experiments), list(experiments)
    rates = {"retinanet-2s": 0.004, "frcnn": committed_rate, "dfine": committed_rate}
    for name, model in FAMILY_EXPERIMENTS.items():
        assert experiments[name]["params"]["params.yaml"]["data"]["model"] == model
        for metric, mlflow_key in (("AP50", "eval/AP50"), ("parameters", "parameters"),
                                   ("train_images_per_second", "train_images_per_second")):
            dvc_value = experiments[name]["metrics"]["metrics/eval.json"]["data"][metric]
            assert mlflow_metric(repo, name, mlflow_key) == pytest.approx(dvc_value, abs=1e-9), (name, metric)
        # Trained with its own params: the MLflow run (in the workspace's store, not an executor's copy) has them.
        assert mlflow_param(repo, name, "model.name") == model, name
        assert float(mlflow_param(repo, name, "train.learning_rate")) == rates[name], name

    compare_prints_the_families_side_by_side_with_only_the_changed_params(repo, experiments)
    mlflow_ui_shows_the_same_numbers(repo, experiments)


def compare_prints_the_families_side_by_side_with_only_the_changed_params(repo, experiments):
    result = make(repo, "compare")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 160
    header = next(line for line in lines if "Experiment" in line)
    assert header.split() == ["Experiment", "AP", "AP50", "AP75", "parameters",
                              "train_images_per_second", "dataset", "model",
                              "train.learning_rate"], header  # the one params.yaml key that differs
    columns = {key: header.index(f" {key}") + len(f" {key}") for key in ("AP50", "parameters",
                                                                          "train_images_per_second")}
    for name, model in FAMILY_EXPERIMENTS.items():  # metrics are right-aligned under their header
        row = next(line for line in lines if f"[{name}]" in line)
        assert f" {model} " in row, row
        for key, end in columns.items():
            shown = float(row[:end].split()[-1])
            assert shown == pytest.approx(experiments[name]["metrics"]["metrics/eval.json"]["data"][key],
                                          rel=1e-4, abs=1e-5), (name, key, row)


def mlflow_ui_shows_the_same_numbers(repo, experiments):
    port = free_port()
    with make_in_background(repo, "mlflow-ui", f"MLFLOW_PORT={port}") as ui:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "pets"},
                                          timeout=2).json()["experiment"]
                break
            except requests.RequestException:
                assert ui.poll() is None, "make mlflow-ui exited"
                time.sleep(1)
        runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                             timeout=10).json()["runs"]
        shown = {tag["value"]: {m["key"]: m["value"] for m in run["data"]["metrics"]}
                 for run in runs for tag in run["data"]["tags"] if tag["key"] == "dvc_exp_name"}
        for name in FAMILY_EXPERIMENTS:
            dvc_ap50 = experiments[name]["metrics"]["metrics/eval.json"]["data"]["AP50"]
            assert shown[name]["eval/AP50"] == pytest.approx(dvc_ap50, abs=1e-9), name


def mlflow_value(repo, exp_name: str, table: str, key: str):
    """From the workspace's MLflow store: ``key`` in ``table`` (latest_metrics or params) of the one run
    tagged with this DVC experiment name."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid FROM tags WHERE key = 'dvc_exp_name' AND value = ?",
                          (exp_name,)).fetchall()
        assert len(runs) == 1, (exp_name, runs)
        (value,) = db.execute(f"SELECT value FROM {table} WHERE run_uuid = ? AND key = ?",  # noqa: S608
                              (runs[0][0], key)).fetchone()
    return value


def mlflow_metric(repo, exp_name: str, key: str) -> float:
    return mlflow_value(repo, exp_name, "latest_metrics", key)


def mlflow_param(repo, exp_name: str, key: str) -> str:
    return mlflow_value(repo, exp_name, "params", key)


def test_typo_in_params_fails_before_any_work(tmp_path):
    scratch = quick_copy(tmp_path)
    text = (scratch / "params.yaml").read_text().replace("learning_rate:", "learnig_rate:")
    (scratch / "params.yaml").write_text(text)
    result = run(["python", "-m", "stages.train", "--records", "data/records", "--pretrained", "models/pretrained",
                  "--checkpoints", "models/checkpoints", "--log", "plots/train_log.csv",
                  "--val-log", "plots/val_log.csv"], scratch, check=False)
    assert result.returncode != 0
    assert "unknown key 'train.learnig_rate' (did you mean 'learning_rate'?)" in result.stderr
    assert not (scratch / "models").exists()
