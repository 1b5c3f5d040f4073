"""A throwaway copy of this repository (its git-visible files) as its own git + DVC repo,
for tests that run ``dvc repro`` / ``dvc exp run`` end to end without touching ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def dvc_env(root: Path) -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="t@example.com")
    env.pop("DVC_ROOT", None)
    # Stage commands say `python`: make it this interpreter, as `make` does with .venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def make_repo_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    env = dvc_env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def run(cmd: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=root, env=dvc_env(root), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """``make -s <args>`` in ``repo`` with this interpreter's venv, output captured."""
    return subprocess.run(["make", "-s", *args, f"VENV={sys.prefix}"], cwd=repo, capture_output=True, text=True)
