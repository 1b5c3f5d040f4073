"""A model's training state read from inside a training run: every weight and every optimizer
variable as numpy arrays, taken by a Keras callback at a chosen stop, saved for the test (the run may
be another process) and compared tensor by tensor. Read from the live model, not through
detkit's own save, restore or digest code, so that it can judge those."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np


def of(model) -> dict[str, np.ndarray]:
    """``weights <index> <path>`` (the model's weights in order, trainable or not) and
    ``optimizer <index> <name>`` (its variables: the step counter and every slot; by name, as the
    optimizer's own name, its path's first part, is numbered per process by Keras)."""
    state = {f"weights {i:04d} {w.path}": np.array(w.numpy()) for i, w in enumerate(model.weights)}
    state.update({f"optimizer {i:04d} {v.name}": np.array(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    return state


def weights(state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's weights, in ``get_weights`` order."""
    return [value for key, value in state.items() if key.startswith("weights ")]


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """The names of the tensors that differ in shape or in any element, or that one side lacks."""
    return sorted(key for key in a.keys() | b.keys()
                  if key not in a or key not in b or a[key].shape != b[key].shape or not np.array_equal(a[key], b[key]))


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}


class Capture(keras.callbacks.Callback):
    """The state when training begins (``stop=None``), or after the loop's ``stop``-th stop counted
    from step 0 (the step ``stop * interval``); kept in ``state`` and, given a ``path``, saved there."""

    def __init__(self, stop: int | None = None, path: Path | str | None = None):
        super().__init__()
        self.stop, self.path = stop, path
        self.state: dict[str, np.ndarray] | None = None

    def on_train_begin(self, logs=None):
        if self.stop is None:
            self._take()

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.stop:
            self._take()

    def _take(self) -> None:
        self.state = of(self.model)
        if self.path:
            np.savez(self.path, **self.state)
