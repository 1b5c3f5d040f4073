"""Run one command and measure its peak memory; kill it before it takes the machine down.

Two figures, written as JSON to ``--json``:

- ``max_rss_gb``: the largest resident set of any single process of the command's tree
  (``getrusage(RUSAGE_CHILDREN)`` of this wrapper, which runs nothing else; exact);
- ``peak_tree_gb``: the largest sum of the resident sets of all its processes at once
  (the command runs in its own session; sampled from ``/proc`` every ``--interval``
  seconds; what worker pools add up to, pages they share counted once per process).

If the tree's sum passes ``--limit-gb``, or the machine's available memory falls under
``--min-available-gb``, the tree is killed and ``killed`` says why.

    python -m benchmarks.peak_rss --json out.json [--limit-gb 20] -- dvc repro -s train
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from detkit.core.fsio import atomic_write_json

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):  # gone between listing and reading
        return 0


def session_pids(session: int) -> list[int]:
    """Every process of a session: the command and all it started (unless one left the session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone between listing and reading
            continue
        if int(fields[3]) == session:  # fields after "pid (comm)": state ppid pgrp session ...
            found.append(int(stat.parent.name))
    return found


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return sys.maxsize


def run(cmd: list[str], limit_gb: float, min_available_gb: float, interval: float) -> dict:
    started = time.perf_counter()
    # Its own session: what is measured and killed is what the command started, nothing else.
    process = subprocess.Popen(cmd, start_new_session=True)
    peak, killed = 0, None
    while process.poll() is None:
        pids = session_pids(process.pid)
        peak = max(peak, sum(rss_bytes(pid) for pid in pids))
        if peak > limit_gb * 1e9:
            killed = f"its processes reached {peak / 1e9:.1f} GB resident (limit {limit_gb:g} GB)"
        elif available_bytes() < min_available_gb * 1e9:
            killed = f"the machine's available memory fell under {min_available_gb:g} GB"
        if killed:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(interval)
    # ru_maxrss is in KiB on Linux: the largest resident set of any waited-for descendant.
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"cmd": cmd, "returncode": process.returncode, "seconds": round(time.perf_counter() - started, 2),
            "max_rss_gb": round(largest / 1e9, 3), "peak_tree_gb": round(max(peak, largest) / 1e9, 3),
            "killed": killed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="kill the command above this many GB resident")
    parser.add_argument("--min-available-gb", type=float, default=1.0,
                        help="kill the command when the machine has less memory available than this")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between /proc samples")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given (put it after --)")
    result = run(cmd, args.limit_gb, args.min_available_gb, args.interval)
    atomic_write_json(args.json, result)
    if result["killed"]:
        print(f"peak_rss: killed {' '.join(cmd)}: {result['killed']}", file=sys.stderr)
    return result["returncode"] if result["returncode"] >= 0 else 128 - result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
