"""Peak resident memory of processes, read from Linux's own high-water mark (exact, no sampling)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status``; 0 once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))


def reset_peaks(pids: list[int]) -> int:
    """Each process's high-water resident set set back to its resident set now (Linux's clear_refs);
    returns their sum, in bytes: what the peaks that follow are measured from."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return sum(status_kib(pid, "VmRSS") for pid in pids) * 1024


def peaks(pids: list[int]) -> int:
    """The sum of the high-water resident sets of ``pids``, in bytes."""
    return sum(status_kib(pid, "VmHWM") for pid in pids) * 1024


def peak_growth(call: Callable[[], object]) -> int:
    """Bytes this process's resident set grew by at most while ``call()`` ran. The kernel's high-water
    mark sees a peak however short, where a sampling thread can miss one on a busy machine."""
    start = reset_peaks([os.getpid()])
    call()
    return peaks([os.getpid()]) - start



def _growths_in_order(calls: list[tuple[Callable[..., object], tuple]]) -> list[tuple[int, str | None]]:
    results = []
    for call, args in calls:
        error = None

        def run(call=call, args=args):
            nonlocal error
            try:
                call(*args)
            except Exception as failure:  # noqa: BLE001 - reported to the caller, which asserts on it
                error = f"{type(failure).__name__}: {failure}"

        results.append((peak_growth(run), error))
    return results


def growths_in_a_fresh_process(calls: list[tuple[Callable[..., object], tuple]]) -> list[tuple[int, str | None]]:
    """``peak_growth`` of each ``call(*args)``, in order, in a new interpreter, with the error each
    raised (``None`` if none). Allocators keep memory a process has used (TensorFlow's decoders
    included), so in a process that has run a large decode before, the same decode can grow the
    resident set by a fraction of its cost: only a process that has not can measure it."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_growths_in_order, (calls,))
