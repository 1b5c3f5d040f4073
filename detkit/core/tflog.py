"""TensorFlow's C++ start-up lines, kept off the console.

Importing TensorFlow and initialising its devices prints lines a user cannot act on: absl's
"All log messages before absl::InitializeLog() is called are written to STDERR", CUDA probes
on machines without a GPU ("Could not find cuda drivers", "failed call to cuInit"), oneDNN
and CPU-instruction notices. ``install()`` (called when ``detkit`` is imported, so before
any stage imports TensorFlow) wraps the first ``import tensorflow``: while TensorFlow
imports and probes its devices, file descriptor 2 goes to a temporary file; afterwards the
C++ log lines are dropped and everything else written meanwhile is passed on to stderr (and
oneDNN's data-type notice, which would come at the first training step, is made to come before
it, dropped the same way: ``log_onednn_notice``). If
the import fails, everything is passed on. Later C++ logs keep TensorFlow's own filter,
``TF_CPP_MIN_LOG_LEVEL``, which defaults to 1 here (warnings and errors shown, info not).

``DETKIT_TF_LOGS=1`` turns all of this off: TensorFlow prints what it always prints.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from detkit.core import first_import

VARIABLE = "DETKIT_TF_LOGS"
# absl's pre-init notice, and C++ log lines: severity letter, MMDD, time, thread, file:line].
_CPP_LINE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\)"
                       rb"|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\])")


def install() -> None:
    if os.environ.get(VARIABLE, "").lower() in ("1", "true", "yes"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    first_import.wrap("tensorflow", _quietly)


def _quietly(module, execute) -> None:
    with _without_cpp_lines():
        execute()
        # Device probing (cuInit and friends) logs at the first device query, not at import.
        module.config.list_physical_devices()


def log_onednn_notice() -> None:
    """Have oneDNN's one data-type notice logged now, while it is dropped, rather than at the first step.

    On CPUs without AVX-512, the first integer Transpose oneDNN sees logs "oneDNN supports DT_INT64
    only on platforms with AVX-512. Falling back to the default Eigen-based implementation" at error
    level, once per process. Training meets one inside KerasHub's box matching (Keras' TensorFlow
    backend transposes int64 indices), which is not ours to change; turning oneDNN off
    (TF_ENABLE_ONEDNN_OPTS=0) would silence it at 2.7x the train step's time on such a CPU. Nothing is
    wrong: Eigen runs the integer ops, as it would without oneDNN.

    Called by training once its distribution strategy exists: running an op sets up TensorFlow's
    runtime, after which a multi-worker strategy can no longer configure its collective ops."""
    if os.environ.get(VARIABLE, "").lower() in ("1", "true", "yes"):
        return
    import tensorflow as tf

    with _without_cpp_lines():
        tf.transpose(tf.zeros([1, 2], tf.int64))


@contextlib.contextmanager
def _without_cpp_lines() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = lines if failed else [line for line in lines if not _CPP_LINE.match(line)]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
                sys.stderr.flush()
