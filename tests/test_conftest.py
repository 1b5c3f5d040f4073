"""The suite's own arrangement under `make test`'s two workers: the tests of a module that share a module
fixture run on one worker, so it is built once (and the demo's run, for every test that needs it);
other tests spread over both; the longest groups are handed out first."""

from __future__ import annotations

import re
import subprocess
import sys

from harness.repo_copy import REPO_ROOT


def test_a_module_fixture_is_built_on_one_worker_and_independent_tests_spread():
    # A module whose tests share a module fixture, and one whose tests share none (collected first, so
    # its first two tests are the first two handed out, one to each worker).
    shared, independent = "tests/test_validate.py", "tests/test_layers.py"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist",
                             "loadgroup", "--no-loadscope-reorder", "-v", independent, shared],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"^\[(gw\d)\] .*PASSED (tests/\w+\.py)::", result.stdout, re.M):
        workers.setdefault(module, set()).add(worker)
    assert workers == {shared: workers[shared], independent: {"gw0", "gw1"}}, workers
    assert len(workers[shared]) == 1, workers


def test_the_longest_groups_are_handed_out_first():
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                             "tests/test_validate.py", "tests/test_dfine.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    first, second = result.stdout.splitlines()[:2]
    assert first == "tests/test_dfine.py::test_tiny_learns_on_the_sample_and_goes_through_eval_and_export"
    assert second.startswith("tests/test_dfine.py::")  # the module's shared fixture next, then the rest
