"""The suite's own arrangement: under `make test`'s two workers, a module's tests share one worker, so
its module fixtures (and the demo's run, for every test that needs it) are built once."""

from __future__ import annotations

import re
import subprocess
import sys

from harness.repo_copy import REPO_ROOT


def test_each_module_runs_on_one_worker():
    modules = ["tests/test_layers.py", "tests/test_dvc_deps.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist",
                             "loadgroup", "-v", *modules], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"^\[(gw\d)\] .*PASSED (tests/\w+\.py)::", result.stdout, re.M):
        workers.setdefault(module, set()).add(worker)
    assert sorted(workers) == sorted(modules)
    assert all(len(ran_on) == 1 for ran_on in workers.values()), workers
