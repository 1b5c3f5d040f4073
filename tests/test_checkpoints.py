"""detkit.train.checkpoints: what a resumed run starts from is exactly what the interrupted run saved
(every weight, every optimizer slot, the step counter), with a real tiny model and a real Adam step;
the folder's index, pruning, best model and fingerprint. Fast, so `make mutate` runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detkit.config import load_config
from detkit.models import family as F
from detkit.train import checkpoints as CK
from detkit.train.optimizer import make_optimizer, make_schedule
from tests import training_state

OVERRIDES = ["dataset=sample", "model=retinanet_tiny", "model.image_size=64", "train.warmup_steps=0"]


def compiled_model(cfg, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    model = F.build(cfg.model, 37, None).model
    model.compile(optimizer=make_optimizer(cfg.train, make_schedule(cfg.train)))
    model.optimizer.build(model.trainable_variables)
    return model


def take_steps(model, steps: int, seed: int) -> None:
    """Real Adam updates (step counter, both moments, the weights) with seeded stand-in gradients."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        model.optimizer.apply_gradients(
            (rng.normal(size=v.shape).astype(v.dtype), v) for v in model.trainable_variables)


@pytest.fixture(scope="module")
def trained():
    """A tiny RetinaNet after three optimizer steps, its state and the config it was built with."""
    cfg = load_config(overrides=OVERRIDES)
    model = compiled_model(cfg, seed=1)
    take_steps(model, 3, seed=2)
    return cfg, model, training_state.of(model)


def test_restore_gives_back_every_weight_and_optimizer_slot_and_the_step(tmp_path, trained):
    cfg, model, state = trained
    folder = CK.save(tmp_path, model, 3, "fp", {CK.TRAIN_LOG: b"step\n1\n"}, keep=2)
    assert folder == tmp_path / "ckpt-0000003"
    assert (folder / CK.TRAIN_LOG).read_bytes() == b"step\n1\n"
    assert json.loads((folder / "state.json").read_text()) == {"step": 3, "fingerprint": "fp"}

    resumed = compiled_model(cfg, seed=99)  # other initial weights, fresh optimizer
    assert training_state.differences(state, training_state.of(resumed))  # the control: they differ
    CK.restore(folder, resumed, 3)
    assert training_state.differences(state, training_state.of(resumed)) == []
    assert int(resumed.optimizer.iterations.numpy()) == 3
    slots = [key for key in state if key.startswith("optimizer ") and key.endswith("_momentum")]
    assert slots and all(np.any(state[key]) for key in slots)  # the moments are real, not zeros


def test_a_checkpoint_of_another_step_is_refused(tmp_path, trained):
    cfg, model, _ = trained
    folder = CK.save(tmp_path, model, 3, "fp", {}, keep=1)
    with pytest.raises(CK.CheckpointError, match=r"ckpt-0000003: optimizer state not restored \(iterations 3, "
                                                 r"checkpoint step 4\); delete the checkpoints folder"):
        CK.restore(folder, compiled_model(cfg, seed=5), 4)


def test_the_index_names_the_newest_complete_checkpoint_and_old_ones_are_pruned(tmp_path, trained):
    _, model, _ = trained
    for step in (1, 2, 3):
        CK.save(tmp_path, model, step, "fp", {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "ckpt-0000002", "ckpt-0000003"]
    assert CK.latest(tmp_path) == {"latest": "ckpt-0000003", "step": 3, "fingerprint": "fp"}
    (tmp_path / "ckpt-0000003" / "state.json").unlink()  # a folder the index names, left incomplete
    assert CK.latest(tmp_path) is None
    assert CK.latest(tmp_path / "nothing here") is None


def test_best_belongs_to_its_fingerprint_and_clear_keeps_other_files(tmp_path, trained):
    _, model, _ = trained
    record = {"step": 2, "AP50": 0.5, "AP": 0.3, "fingerprint": "fp"}
    CK.save_best(tmp_path, model, record)
    assert CK.best(tmp_path, "fp") == record
    assert CK.best(tmp_path, "other") is None
    CK.save(tmp_path, model, 2, "fp", {}, keep=1)
    (tmp_path / CK.FINAL).mkdir()
    (tmp_path / CK.RUN_FILE).write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    CK.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    CK.clear(tmp_path / "nothing here")  # nothing to clear is fine


def test_the_fingerprint_follows_what_decides_the_weights_not_how_often_the_run_saves(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    (records / "train-00000-of-00001.tfrecord").write_bytes(b"shard")
    (records / "label_map.pbtxt").write_bytes(b"labels")
    (records / "val-00000-of-00001.tfrecord").write_bytes(b"val")
    base = CK.fingerprint(load_config(overrides=OVERRIDES), records, None)
    assert len(base) == 16
    for change in ("checkpoint_every=7", "keep_checkpoints=9", "log_every=7", "eval_every=7"):
        assert CK.fingerprint(load_config(overrides=[*OVERRIDES, f"train.{change}"]), records, None) == base, change
    best = load_config(overrides=[*OVERRIDES, "train.eval_every=7", "train.keep=best"])
    assert CK.fingerprint(best, records, None) == base
    assert CK.fingerprint(load_config(overrides=[*OVERRIDES, "train.learning_rate=0.5"]), records, None) != base
    assert CK.fingerprint(load_config(overrides=[*OVERRIDES, "model.image_size=96"]), records, None) != base
    (records / "val-00000-of-00001.tfrecord").write_bytes(b"other val")  # not training data
    assert CK.fingerprint(load_config(overrides=OVERRIDES), records, None) == base
    (records / "train-00000-of-00001.tfrecord").write_bytes(b"other shard")
    assert CK.fingerprint(load_config(overrides=OVERRIDES), records, None) != base
