"""Keras without the optional extras no part of the pipeline uses.

Keras imports scikit-learn (for its scikit-learn wrappers), pandas (for DataFrames given to
``fit``) and matplotlib (for its plotting helpers) whenever they are installed, and they are
installed here because MLflow's tracking server needs them. Keras treats each one as optional,
and the pipeline uses none of these features. Loading them would still cost every process that
starts TensorFlow and KerasHub about 1.8 CPU-seconds, 40% of that start (benchmarks/tf_start.py).
``install()`` (called when ``detkit`` is imported) lets Keras's own first import see them as
absent (and TensorFlow's, which Keras imports when it comes first). Afterwards they import as
usual, for MLflow or anyone else. In a detkit process, ``keras.wrappers`` and
``keras.visualization`` therefore say that scikit-learn or matplotlib is not installed, and
``fit``/``predict`` take no pandas DataFrames; import Keras before ``detkit`` where you need them.
"""

from __future__ import annotations

import sys

from detkit.core import first_import

EXTRAS = ("sklearn", "pandas", "matplotlib")


def install() -> None:
    first_import.wrap("keras", _without_extras)


def _without_extras(module, execute) -> None:
    absent = [name for name in EXTRAS if name not in sys.modules]
    for name in absent:
        sys.modules[name] = None  # the import system's "not installed"
    try:
        execute()
    finally:
        for name in absent:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
