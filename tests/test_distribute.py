"""detkit.train.distribute through the train stage: the GPU branch (mixed precision + MirroredStrategy) on
two logical CPU devices, and MultiWorkerMirroredStrategy over two worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detkit.models import family as F
from detkit.train import distribute
from harness.repo_copy import activated_env
from tests import training_state

REPO = Path(__file__).resolve().parents[1]
TINY = ["dataset=sample", "model=retinanet_tiny", "model.image_size=64", "train.batch_size=4", "train.max_boxes=2",
        "train.shuffle_buffer=32", "train.warmup_steps=1", "train.learning_rate=0.003"]


def result_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


@pytest.mark.slow
def test_mixed_precision_and_mirrored_strategy_train_resume_evaluate_and_export_float32(tmp_path, sample_records):
    overrides = [*TINY, "train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.distribute=mirrored",
                 "train.mixed_precision=true", "export.check_images=4"]
    # tests/programs.py: the CPU split into two logical devices, so MirroredStrategy has two replicas.
    done = subprocess.run([sys.executable, "-m", "tests.programs", "mirrored", str(tmp_path), str(sample_records),
                           json.dumps(overrides)], cwd=REPO, env=activated_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "train: mirrored strategy (2 replicas), mixed_float16" in done.stdout
    result = result_line(done.stdout)
    assert result["summary"]["resumed"] and result["summary"]["start_step"] == 2
    # Resumed with every weight and optimizer variable (loss scale included) as they were after step 2.
    at_checkpoint, at_resume = (training_state.load(tmp_path / name) for name in ("at_checkpoint.npz", "at_resume.npz"))
    assert [key for key in at_resume if key.endswith("_momentum")] and [key for key in at_resume if "scale" in key]
    assert training_state.differences(at_checkpoint, at_resume) == []
    assert result["policy"] == "float32"  # the stage leaves the process as it found it

    rows = (tmp_path / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]
    assert all(float(v) == float(v) and abs(float(v)) < 1e6 for r in rows for v in r.split(",")[1:])  # finite

    final_config = json.loads((tmp_path / "checkpoints" / "final" / "config.json").read_text())
    assert final_config["config"]["dtype"]["config"]["name"] == "float32"
    check = json.loads((Path(result["export"]) / "assets.extra" / "export_check.json").read_text())
    assert check["passed"]
    import tensorflow as tf

    served = tf.saved_model.load(result["export"]).signatures["serving_default"]
    assert {spec.dtype for spec in served.structured_outputs.values()} <= {tf.float32}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports




def start_workers(tmp_path: Path, records: Path, overrides: list[str], checkpoints: list[Path],
                  last_stop: int) -> list[subprocess.Popen]:
    """Two train stage processes, worker 0 (the chief) and worker 1, joined by TF_CONFIG; each saves its
    state after stop ``last_stop`` to ``tmp_path / state<index>.npz``."""
    hosts = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = []
    for index in range(2):
        env = activated_env(TF_CONFIG=json.dumps({"cluster": {"worker": hosts},
                                                  "task": {"type": "worker", "index": index}}),
                            MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", DVC_ROOT=str(REPO))
        log = open(tmp_path / f"worker{index}.out", "a")
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tests.programs", "worker", str(tmp_path / f"state{index}.npz"), str(last_stop),
             "--records", str(records), "--checkpoints", str(checkpoints[index]),
             "--log", str(tmp_path / f"w{index}" / "train_log.csv"),
             "--val-log", str(tmp_path / f"w{index}" / "val_log.csv"), *overrides],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return workers


def finish(workers: list[subprocess.Popen], tmp_path: Path) -> list[str]:
    outputs = []
    for index, worker in enumerate(workers):
        code = worker.wait(timeout=900)
        outputs.append((tmp_path / f"worker{index}.out").read_text())
        assert code == 0, outputs[-1][-4000:]
    return outputs


def digests(output: str) -> str:
    return re.findall(r"trainable weights digest ([0-9a-f]+)", output)[-1]


@pytest.mark.slow
def test_two_workers_train_alike_only_the_chief_writes_and_a_killed_run_resumes(tmp_path, sample_records):
    overrides = [*TINY, "train.steps=48", "train.checkpoint_every=4", "train.log_every=4", "train.distribute=auto"]
    chief_dir, worker_dir = tmp_path / "chief", tmp_path / "worker"
    workers = start_workers(tmp_path, sample_records, overrides, [chief_dir, worker_dir], 48 // 4)
    deadline = time.time() + 600
    while time.time() < deadline and (json.loads((chief_dir / "checkpoint.json").read_text())["step"]
                                      if (chief_dir / "checkpoint.json").is_file() else 0) < 8:
        ended = [index for index, w in enumerate(workers) if w.poll() is not None]
        assert not ended, "a worker ended before it was killed:\n" + "\n".join(
            (tmp_path / f"worker{index}.out").read_text()[-3000:] for index in ended)
        time.sleep(0.2)
    for worker in workers:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    killed_at = json.loads((chief_dir / "checkpoint.json").read_text())["step"]
    assert 8 <= killed_at < 48
    assert not worker_dir.exists() and not (tmp_path / "w1").exists()  # only the chief writes
    assert not (chief_dir / "final").exists()

    # Re-run: both resume from the chief's checkpoint (worker 1 reads the chief's folder, as it
    # would on a shared disk or in SageMaker's synced checkpoint folder).
    workers = start_workers(tmp_path, sample_records, overrides, [chief_dir, chief_dir], 48 // 4)
    chief_out, worker_out = finish(workers, tmp_path)

    # Both trained alike: every trainable weight and optimizer variable equal, tensor by tensor. The negative
    # control is in the same comparison: batch-norm moving statistics are not synchronised (each worker
    # updates its own from its own batches), and they differ, so the workers did read different data and
    # the comparison does tell different tensors apart: the equal ones are equal because each step's
    # gradients were combined across the workers.
    chief, worker = (training_state.load(tmp_path / f"state{index}.npz") for index in range(2))
    differ = training_state.differences(chief, worker)
    assert differ and all(re.search(r"/moving_(mean|variance)$", key) for key in differ), differ

    for output in (chief_out, worker_out):
        assert "multi_worker strategy (2 workers, 2 replicas)" in output
        assert f"resuming from {chief_dir / f'ckpt-{killed_at:07d}'} (step {killed_at} of 48)" in output
    assert digests(chief_out) == digests(worker_out)  # and the line each worker prints says so

    from detkit.models import family as F

    _, final, info = F.load_trained(chief_dir / "final")
    assert info["step"] == 48
    assert training_state.differences(dict(enumerate(final.get_weights())),
                                      dict(enumerate(training_state.weights(chief)))) == []  # the chief's
    assert not (tmp_path / "w1").exists()
    rows = (tmp_path / "w0" / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(4, 49, 4))


def test_weights_digest_changes_with_any_trainable_weight_and_ignores_moving_statistics():
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    digest = distribute.weights_digest(model)
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    twin = keras.models.clone_model(model)  # other variables, freshly initialised...
    assert distribute.weights_digest(twin) != digest
    twin.set_weights(model.get_weights())  # ...then holding the same values
    assert distribute.weights_digest(twin) == digest
    for weight in model.weights:  # the smallest change of one element: seen in every trainable weight only
        saved = weight.numpy()
        changed = saved.copy()
        changed.flat[-1] = np.nextafter(changed.flat[-1], np.float32(np.inf))
        weight.assign(changed)
        assert (distribute.weights_digest(model) != digest) is weight.trainable, weight.path
        weight.assign(saved)
    assert {w.path.rsplit("/", 1)[1] for w in model.non_trainable_weights} == {"moving_mean", "moving_variance"}


def test_auto_picks_multi_worker_only_when_tf_config_names_two_workers():
    two = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})
    assert distribute.cluster_workers({}) == 1
    assert distribute.cluster_workers({"TF_CONFIG": two}) == 2
    chief_plus_one = json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "chief"}})
    assert distribute.cluster_workers({"TF_CONFIG": chief_plus_one}) == 2
    with pytest.raises(ValueError, match="TF_CONFIG: not valid JSON"):
        distribute.cluster_workers({"TF_CONFIG": "{cluster"})


@pytest.mark.parametrize("setting, gpus, family, mixed", [
    ("auto", True, "retinanet", True),
    ("auto", True, "faster_rcnn", True),
    ("auto", True, "dfine", False),  # its train step cannot be built in float16
    ("auto", False, "retinanet", False),
    ("auto", False, "dfine", False),
    ("true", False, "retinanet", True),
    ("True", False, "faster_rcnn", True),
    ("false", True, "retinanet", False),
    ("false", True, "dfine", False),
])
def test_mixed_precision_follows_the_setting_the_machine_and_the_family(setting, gpus, family, mixed):
    assert distribute.mixed_precision(setting, gpus, F.family(family)) is mixed


@pytest.mark.parametrize("gpus", [True, False])
def test_mixed_precision_forced_on_a_float32_family_is_refused(gpus):
    with pytest.raises(ValueError, match=r"^train.mixed_precision: true, but the dfine family trains in float32"):
        distribute.mixed_precision("true", gpus, F.family("dfine"))
