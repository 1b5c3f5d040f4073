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
    shared, independent = "tests/test_validate.py", "tests/test_annotations.py"
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
                             "tests/test_validate.py", "tests/test_dvc_pipeline.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    first, second = result.stdout.splitlines()[:2]
    assert first == ("tests/test_dvc_pipeline.py::"
                     "test_experiments_of_three_families_show_up_in_dvc_exp_show_compare_and_mlflow")
    assert second == "tests/test_dvc_pipeline.py::test_data_stages_run_once_and_rerun_only_on_their_params"
