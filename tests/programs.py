"""Programs the tests run in a process of their own, where the test needs what only a fresh process
gives: TensorFlow not yet started (devices split, or not loaded at all), or a stderr that C libraries
write to directly.

    python -m tests.programs <program> <arguments>

Each program imports what it needs inside its function: what a process has imported before it
starts is what some of them test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def mirrored(out: str, records: str, overrides: str) -> int:
    """The GPU branch on CPU: train (crashing after step 3, the checkpoint of step 2 written), resume,
    evaluate and export with the JSON list ``overrides``, on the CPU split into two logical devices
    before TensorFlow starts, so MirroredStrategy really has two replicas. Prints ``RESULT <json>``."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from detkit.config import load_config
    from stages import eval as evaluate
    from stages import export, train
    from tests.training_state import Capture

    class Crash(RuntimeError):
        pass

    class CrashAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == 3:
                raise Crash()

    folder, records_folder = Path(out), Path(records)
    cfg = load_config(overrides=json.loads(overrides))
    paths = {"checkpoints": folder / "checkpoints", "log": folder / "train_log.csv",
             "val_log": folder / "val_log.csv"}
    uri = f"sqlite:///{folder}/mlflow.db"
    try:
        train.run(cfg, {"records": records_folder}, paths, tracking_uri=uri,
                  callbacks=[Capture(stop=2, path=folder / "at_checkpoint.npz"), CrashAfter()])
    except Crash:
        pass
    summary = train.run(cfg, {"records": records_folder}, paths, tracking_uri=uri,
                        callbacks=[Capture(path=folder / "at_resume.npz")])
    metrics = evaluate.run(cfg, {"records": records_folder, "checkpoints": paths["checkpoints"]},
                           {"metrics": folder / "metrics", "plots": folder / "plots"})["metrics"]
    exported = export.run(cfg, {"records": records_folder, "checkpoints": paths["checkpoints"]},
                          {"export": folder / "export"})
    print("RESULT " + json.dumps({"summary": summary, "AP50": metrics["AP50"], "export": exported["path"],
                                  "policy": keras.mixed_precision.global_policy().name}))
    return 0


def worker(state: str, last_stop: str, *stage_argv: str) -> int:
    """A training worker: the train stage's command line (``stage_argv``), as ``python -m stages.train``
    runs it, saving this worker's state after stop ``last_stop`` to ``state``: only the chief writes
    anything of its own, yet a test compares what every worker trained."""
    from stages import train
    from tests.training_state import Capture

    capture = Capture(stop=int(last_stop), path=state)
    stage_run = train.run
    train.run = lambda *args, **options: stage_run(*args, callbacks=[capture], **options)
    return train.main(list(stage_argv))


def typos(runs: str) -> int:
    """Each program's ``main`` of the JSON ``{module: argv}`` ``runs`` returns 2; prints the TensorFlow and
    Keras modules this process then holds (none, when a typo stops every program before it loads them)."""
    import importlib

    for module, argv in json.loads(runs).items():
        assert importlib.import_module(module).main(argv) == 2, module
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
    return 0


def decode(*shards: str) -> int:
    """Decode every image of the TFRecord ``shards`` with TensorFlow; prints how many."""
    import tensorflow as tf

    decoded = 0
    for serialized in tf.data.TFRecordDataset(list(shards)):
        example = tf.train.Example.FromString(serialized.numpy())
        tf.io.decode_image(example.features.feature["image/encoded"].bytes_list.value[0])
        decoded += 1
    print(decoded)
    return 0


def extras(order: str, *extra_modules: str) -> int:
    """Imports the modules of the comma-separated ``order`` one after the other; prints which of
    ``extra_modules`` that loaded, as JSON, then imports each of them, as MLflow would."""
    import importlib

    for module in order.split(","):
        importlib.import_module(module)

    loaded = sorted(name for name in extra_modules if name in sys.modules)
    for name in extra_modules:
        importlib.import_module(name)
    print(json.dumps(loaded))
    return 0


PROGRAMS = {"mirrored": mirrored, "worker": worker, "typos": typos, "decode": decode, "extras": extras}

if __name__ == "__main__":
    sys.exit(PROGRAMS[sys.argv[1]](*sys.argv[2:]))
