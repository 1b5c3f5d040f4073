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


def _error_of(call: Callable[..., object], args: tuple) -> str | None:
    try:
        call(*args)
    except Exception as failure:  # noqa: BLE001 - reported to the caller, which asserts on it
        return f"{type(failure).__name__}: {failure}"
    return None


def _growths_in_order(calls: list[tuple[Callable[..., object], tuple]]) -> list[tuple[int, str | None]]:
    results = []
    for call, args in calls:
        start = reset_peaks([os.getpid()])
        error = _error_of(call, args)
        results.append((peaks([os.getpid()]) - start, error))
    return results


def growths_in_a_fresh_process(calls: list[tuple[Callable[..., object], tuple]]) -> list[tuple[int, str | None]]:
    """Bytes the resident set grew by at most during each ``call(*args)``, in order, in a new
    interpreter (the kernel's high-water mark: a peak however short), with the error each raised
    (``None`` if none). Allocators keep memory a process has used (TensorFlow's decoders
    included), so in a process that has run a large decode before, the same decode can grow the
    resident set by a fraction of its cost: only a process that has not can measure it."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_growths_in_order, (calls,))
