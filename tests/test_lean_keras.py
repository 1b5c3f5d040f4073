"""detkit.core.lean_keras: a process that imports detkit starts TensorFlow without Keras's optional
extras, and can still import them afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.repo_copy import REPO_ROOT

EXTRAS = ["matplotlib", "pandas", "sklearn"]


def loaded_at_start(order: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "tests.programs", "extras", order, *EXTRAS, "matplotlib.pyplot"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # each extra imported afterwards
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(("order", "loaded"), [
    # TensorFlow looks Keras up (importlib.util.find_spec) before it imports it: the hook must survive
    # the look-up and act at the import.
    ("detkit,tensorflow,keras_hub", []),
    ("detkit,keras,keras_hub", []),  # the train loop's order: Keras, which imports TensorFlow
    # Keras alone loads all three: were it to stop, lean_keras would have nothing left to do.
    ("keras,keras_hub", EXTRAS + ["matplotlib.pyplot"]),
])
def test_tensorflow_starts_without_the_extras_once_detkit_is_imported(order, loaded):
    assert loaded_at_start(order) == sorted(loaded)
