"""CPU time a fresh process spends starting TensorFlow and KerasHub, as a stage does (``detkit``
imported first, so Keras loads without its optional extras: detkit/core/lean_keras.py), against
the same imports without ``detkit`` (Keras loads scikit-learn, pandas and matplotlib). The stage's
side also pays for importing ``detkit`` and for tflog's device probe, so the ratio understates
the saving.

    python -m benchmarks.tf_start [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys

GOAL = 0.8  # a stage's start at most this share of the baseline's CPU time
FIRST = {"stage": "detkit", "baseline": "tensorflow"}


def start(first: str) -> float:
    """CPU seconds of a new process that imports ``first``, then TensorFlow, then KerasHub."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.tf_start", "--child", first],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def child(first: str) -> None:
    for module in (first, "tensorflow", "keras_hub"):
        importlib.import_module(module)

    times = os.times()
    print(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=sorted(FIRST.values()), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    cpu = {kind: [] for kind in FIRST}
    for _ in range(args.rounds):  # interleaved, so a change in the machine's speed reaches both
        for kind, first in FIRST.items():
            cpu[kind].append(start(first))
    stage, baseline = (statistics.median(cpu[kind]) for kind in ("stage", "baseline"))
    ratio = stage / baseline
    print(f"TensorFlow + KerasHub start, baseline (no detkit, Keras with its extras): {baseline:5.2f} CPU-s (median of "
          f"{args.rounds})")
    print(f"TensorFlow + KerasHub start, as a stage (detkit first):                  {stage:5.2f} CPU-s")
    print(f"start ratio: {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
