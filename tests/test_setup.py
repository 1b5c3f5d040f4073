"""`make setup` refuses, before it makes anything, a Python that cannot run the project: one without
tarfile's extraction filters (before 3.11.4; Debian 12's python3 is 3.11.2), which the download stage
would only meet at the first archive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.repo_copy import REPO_ROOT, user_env

# The interpreter this venv was made from, and the system's own: on this project's machines the second
# is Debian's 3.11.2, so both answers are exercised.
INTERPRETERS = sorted({str(Path(p)) for p in (sys._base_executable, "/usr/bin/python3") if Path(p).exists()})


def has_extraction_filters(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import tarfile; print(callable(tarfile.data_filter))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


@pytest.mark.parametrize("python", INTERPRETERS)
def test_setup_takes_only_a_python_with_tarfile_extraction_filters(python, tmp_path):
    def make(target: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", target, f"PYTHON_SYSTEM={python}", f"VENV={tmp_path / 'venv'}"],
                              cwd=REPO_ROOT, env=user_env(), capture_output=True, text=True)

    if has_extraction_filters(python):  # the check setup runs first lets it through
        checked = make("python-check")
        assert checked.returncode == 0, checked.stderr
        return
    refused = make("setup")
    version = subprocess.run([python, "-V"], capture_output=True, text=True).stdout.strip()
    assert refused.returncode == 2
    assert (f"make setup: {python} ({version}) has no tarfile extraction filters; the project needs Python "
            "3.11.4 or newer") in refused.stderr
    assert not (tmp_path / "venv").exists()
