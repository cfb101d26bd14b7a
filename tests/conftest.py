"""Shared fixtures: a copy of this repository as a fresh git repo, and small helpers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import postgres_mlflow, postgres_registry  # noqa: F401 - session services

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def project_env(**extra: str) -> dict[str, str]:
    """Environment for running `genpipe` / `dvc` as a user would, with this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "GENPIPE_ROOT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, *, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run a command and capture its output; on an unexpected status fail with that output."""
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(**env), capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_repo(dst: Path) -> Path:
    """The project's tracked and unignored files as a fresh git repository at `dst` (what a clone holds)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "models/", "reports/")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    # The DVC remote defaults to a folder beside the repo: keep it inside the copy's parent.
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@genpipe"],
        ["git", "config", "user.name", "genpipe test"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "fixture"],
    ):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A fresh clone-like copy of this repository, one per test."""
    return copy_repo(tmp_path / "repo")


@pytest.fixture
def free_port() -> int:
    """A TCP port on the loopback address that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
