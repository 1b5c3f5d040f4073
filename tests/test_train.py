"""stages.train: a short run writes log, checkpoints, final model and an MLflow run; a crashed run resumes."""

from __future__ import annotations

import csv
import json
import re
import subprocess

import keras
import pytest
from mlflow.tracking import MlflowClient

from detkit.config import load_config
from detkit.models import family as F
from detkit.train import checkpoints as CK
from detkit.train import tracking
from detkit.train.optimizer import make_optimizer, make_schedule
from stages import train
from tests import training_state
from tests.conftest import REPO_ROOT

STEPS = 4
OVERRIDES = [
    "dataset=sample", "model=retinanet_tiny", "model.image_size=64",
    f"train.steps={STEPS}", "train.batch_size=2", "train.checkpoint_every=2", "train.warmup_steps=1",
    "train.learning_rate=0.003", "train.max_boxes=2", "train.shuffle_buffer=32", "train.log_every=1",
]


class Crash(RuntimeError):
    pass


class CrashAt(keras.callbacks.Callback):
    """Dies like a killed process would, after step ``step`` (its checkpoint, if any, is on disk)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.step:
            raise Crash(f"simulated crash after step {self.step}")


@pytest.fixture
def paths(tmp_path, sample_records):
    return {
        "inputs": {"records": sample_records, "pretrained": tmp_path / "pretrained"},
        "outputs": {"checkpoints": tmp_path / "checkpoints", "log": tmp_path / "plots" / "train_log.csv",
                    "val_log": tmp_path / "plots" / "val_log.csv"},
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def _log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_short_run_writes_log_checkpoints_model_and_mlflow_run(paths, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-under-test")
    cfg = load_config(overrides=OVERRIDES)
    summary = train.run(cfg, paths["inputs"], paths["outputs"], tracking_uri=paths["uri"])
    ckpt = paths["outputs"]["checkpoints"]

    rows = _log(paths["outputs"]["log"])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["step", "loss", "box_loss", "class_loss", "learning_rate"]
    assert float(rows[0]["learning_rate"]) == 0.0 and float(rows[1]["learning_rate"]) == pytest.approx(0.003)

    index = json.loads((ckpt / "checkpoint.json").read_text())
    assert index["step"] == STEPS and index["latest"] == "ckpt-0000004"
    assert sorted(p.name for p in ckpt.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000004"]
    for name in ("model.weights.h5", "state.json", "train_log.csv"):
        assert (ckpt / "ckpt-0000004" / name).is_file()

    _, detector, info = F.load_trained(ckpt / "final")
    assert info["num_classes"] == 37 and info["image_size"] == 64 and info["step"] == STEPS
    assert info["label_offset"] == 1 and (ckpt / "final" / "label_map.pbtxt").is_file()
    assert detector.num_classes == 37

    run_file = json.loads((ckpt / "mlflow_run.json").read_text())
    assert run_file["run_id"] == summary["mlflow_run_id"] and run_file["tracking_uri"] == paths["uri"]
    client = MlflowClient(paths["uri"])
    run = client.get_run(run_file["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS)
    assert run.data.params["model.name"] == "retinanet_tiny"
    assert run.data.params["model.architecture.backbone.stackwise_num_filters.1"] == "128"
    assert run.data.tags["dvc_exp_name"] == "exp-under-test"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip())  # the suite runs from a git checkout
    assert run.data.tags["git_revision"] == run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {"learning_rate", "box_loss", "class_loss"} <= set(run.data.metrics)
    assert "final" in [a.path for a in client.list_artifacts(run.info.run_id)]

    # Re-running a finished training trains nothing and changes nothing.
    again = train.run(cfg, paths["inputs"], paths["outputs"], tracking_uri=paths["uri"])
    assert again["start_step"] == STEPS and again["mlflow_run_id"] == summary["mlflow_run_id"]


@pytest.mark.slow
def test_crashed_run_resumes_from_its_last_checkpoint(paths):
    cfg = load_config(overrides=OVERRIDES)
    ckpt = paths["outputs"]["checkpoints"]
    at_checkpoint, at_resume = training_state.Capture(stop=2), training_state.Capture()
    with pytest.raises(Crash):
        train.run(cfg, paths["inputs"], paths["outputs"], tracking_uri=paths["uri"],
                  callbacks=[at_checkpoint, CrashAt(3)])
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == 2
    assert not (ckpt / "final").exists()
    first_run = json.loads((ckpt / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(paths["uri"])
    assert client.get_run(first_run).info.status == "FAILED"

    summary = train.run(cfg, paths["inputs"], paths["outputs"], tracking_uri=paths["uri"], callbacks=[at_resume])
    assert summary["start_step"] == 2 and summary["resumed"] and summary["steps"] == STEPS
    # It trains on from exactly where the crashed run was at its checkpoint: every weight and every optimizer
    # variable (step counter, Adam's moments). Not from an uninterrupted run's state at step 4: the resumed
    # run's data starts a new shuffle (seeded train.seed + 2), so its steps 3-4 see other batches.
    slots = [key for key in at_resume.state if key.startswith("optimizer ")]
    assert [key for key in slots if key.endswith(" iteration")] and [key for key in slots if key.endswith("_momentum")]
    assert training_state.differences(at_checkpoint.state, at_resume.state) == []
    assert [int(r["step"]) for r in _log(paths["outputs"]["log"])] == [1, 2, 3, 4]
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == STEPS
    _, _, info = F.load_trained(ckpt / "final")
    assert info["step"] == STEPS
    # The same MLflow run, each step logged once (step 3 of the crashed attempt was never sent).
    assert summary["mlflow_run_id"] == first_run
    assert client.get_run(first_run).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first_run, "loss")) == [1, 2, 3, 4]
    # A checkpoint whose optimizer state does not match its step is refused.
    restored = F.build(cfg.model, 37, None).model
    restored.compile(optimizer=make_optimizer(cfg.train, make_schedule(cfg.train)))
    with pytest.raises(CK.CheckpointError, match="optimizer state not restored"):
        CK.restore(ckpt / "ckpt-0000004", restored, STEPS + 1)

    # Other params: the old checkpoints are not resumed, training starts over.
    changed = load_config(overrides=[*OVERRIDES, "train.learning_rate=0.001"])
    fresh = train.run(changed, paths["inputs"], paths["outputs"], tracking_uri=paths["uri"])
    assert fresh["start_step"] == 0 and fresh["mlflow_run_id"] != first_run


def test_bad_params_exit_2_with_a_message(tmp_path, capsys):
    code = train.main(["--records", str(tmp_path), "--checkpoints", str(tmp_path / "c"), "--log",
                       str(tmp_path / "l.csv"), "--val-log", str(tmp_path / "v.csv"),
                       "--params", "no-such-params.yaml"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_missing_records_exit_2(tmp_path, capsys):
    code = train.main(["--records", str(tmp_path / "nothing"), "--checkpoints", str(tmp_path / "c"),
                       "--log", str(tmp_path / "l.csv"), "--val-log", str(tmp_path / "v.csv")])
    assert code == 2
    assert "label_map.pbtxt" in capsys.readouterr().err


def test_mixed_precision_forced_on_a_float32_family_exits_2_before_any_work(sample_records, tmp_path, capsys):
    checkpoints = tmp_path / "c"
    code = train.main(["--records", str(sample_records), "--checkpoints", str(checkpoints), "--log",
                       str(tmp_path / "l.csv"), "--val-log", str(tmp_path / "v.csv"),
                       "dataset=sample", "model=dfine_tiny", "train.mixed_precision=true"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "train.mixed_precision: true" in err, err
    assert not checkpoints.exists()


def test_git_revision_outside_a_git_checkout_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above it either
    assert tracking.git_revision(tmp_path) == "unknown"


def test_flatten_names_every_leaf():
    assert tracking.flatten({"a": {"b": 1, "c": [2, {"d": None}]}}) == {"a.b": "1", "a.c.0": "2", "a.c.1.d": "None"}


@pytest.mark.parametrize("override, message", [
    ("train.warmup_steps=5000", "train.warmup_steps"),
    ("train.optimizer=adamm", "did you mean 'adam'"),
    ("train.class_loss_weight=0", "train.class_loss_weight"),
    ("train.augment.crop_min_scale=0", "crop_min_scale"),
    ("model.pretrained=kaggle://x/y", "'architecture' builds a model from scratch"),
    ("model.image_size=100", "multiple of 16"),
])
def test_bad_train_and_model_values_are_refused(override, message):
    from detkit.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["dataset=sample", "model=retinanet_tiny", "train.steps=1000", override])


class SilenceClassHeadAfter(keras.callbacks.Callback):
    """Makes every step after ``step`` worse than the ones before: no score reaches the threshold."""

    def __init__(self, step, interval):
        super().__init__()
        self.step, self.interval = step, interval

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) * self.interval == self.step:
            bias = self.model.classification_head.prediction_layer.bias
            bias.assign(keras.ops.full(bias.shape, -20.0))


@pytest.mark.slow
def test_validation_during_training_logs_ap50_and_keep_best_keeps_its_weights(paths):
    cfg = load_config(overrides=[*OVERRIDES, "train.steps=60", "train.batch_size=8", "train.max_boxes=4",
                                 "train.class_loss_weight=10", "train.warmup_steps=5", "train.checkpoint_every=20",
                                 "train.keep_checkpoints=3", "train.eval_every=20", "train.log_every=20",
                                 "train.keep=best", "eval.batch_size=32"])
    summary = train.run(cfg, paths["inputs"], paths["outputs"], tracking_uri=paths["uri"],
                        callbacks=[SilenceClassHeadAfter(40, 20)])
    val = _log(paths["outputs"]["val_log"])
    assert [int(r["step"]) for r in val] == [20, 40, 60] and list(val[0]) == ["step", "AP", "AP50", "AP75"]
    ap50 = [float(r["AP50"]) for r in val]
    assert ap50[2] == 0.0 < max(ap50[:2])  # the silenced head finds nothing
    best_step = [20, 40][ap50.index(max(ap50))]
    assert summary["best"]["step"] == best_step
    ckpt = paths["outputs"]["checkpoints"]
    assert json.loads((ckpt / "best.json").read_text())["step"] == best_step

    _, final, info = F.load_trained(ckpt / "final")
    assert info["step"] == best_step and info["keep"] == "best"
    reference = F.build(cfg.model, 37, None).model
    reference.compile(optimizer=make_optimizer(cfg.train, make_schedule(cfg.train)))
    for step, same in ((best_step, True), (60, False)):
        CK.restore(ckpt / f"ckpt-{step:07d}", reference, step)
        equal = all((a == b).all() for a, b in zip(final.get_weights(), reference.get_weights()))
        assert equal is same, f"final/ vs ckpt-{step}"

    client = MlflowClient(paths["uri"])
    history = client.get_metric_history(summary["mlflow_run_id"], "val/AP50")
    assert sorted((m.step, m.value) for m in history) == list(zip([20, 40, 60], ap50))
