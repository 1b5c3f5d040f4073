"""Running commands as a user does, and throwaway copies of this repository (its git-visible
files) as their own git + DVC repos, for tests that run ``make`` / ``dvc`` end to end.

A user's shell has no venv activated: ``user_env()`` is that shell (this process's
environment with the venv taken off PATH), so ``make`` targets must find the venv themselves,
as the Makefile does. For commands the README says to run in an activated venv (``dvc``,
``mlflow``, ``python -m stages...``), ``activated_env()`` adds what ``source .venv/bin/activate``
adds, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the venv this test run uses; `make` gets it as VENV=...


def user_env(**extra: str) -> dict[str, str]:
    """A new user's shell: no venv on PATH, nothing activated, DVC offline, a git identity."""
    venv_bin = (VENV / "bin").resolve()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    env = dict(os.environ, PATH=os.pathsep.join(path), DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="t@example.com", **extra)
    for name in ("VIRTUAL_ENV", "DVC_ROOT", "PYTHONHOME"):
        env.pop(name, None)
    return env


def activated_env(**extra: str) -> dict[str, str]:
    """``user_env()`` after ``source .venv/bin/activate``."""
    env = user_env(**extra)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(VENV)
    return env


def git_files(root: Path = REPO_ROOT) -> list[str]:
    """The files git would commit: tracked, plus untracked ones it does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, check=True, capture_output=True).stdout.decode().split("\0")
    return [rel for rel in listed if rel and (root / rel).is_file()]


def make_repo_copy(dest: Path, source: Path = REPO_ROOT) -> Path:
    """``source``'s working tree (git-visible files) as a new git repo of one commit."""
    for rel in git_files(source):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=user_env())
    return dest


def run(cmd: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in ``root`` from a shell with the venv activated, output captured."""
    result = subprocess.run(cmd, cwd=root, env=activated_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stage_command(stage: str, *args: str, root: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """``python -m stages.<stage> <args>`` in ``root`` as `dvc repro` runs it (the venv's Python), output
    captured; a failure raises with the stage's own output."""
    return run([sys.executable, "-m", f"stages.{stage}", *args], root)


def make(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``make -s <args>`` in ``repo`` from a user's shell (no venv on PATH), output captured."""
    return subprocess.run(["make", "-s", *args, f"VENV={VENV}"], cwd=repo, env=env or user_env(),
                          capture_output=True, text=True)


@contextlib.contextmanager
def make_in_background(repo: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``make -s <args>`` (a server: make serve, make mlflow-ui) from a user's shell, in its own session,
    stopped with everything it started when the block ends."""
    process = subprocess.Popen(["make", "-s", *args, f"VENV={VENV}"], cwd=repo, env=env or user_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
