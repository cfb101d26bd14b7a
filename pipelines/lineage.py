"""Where a stage runs and what it ran on: the repository root, absolute paths, and the lineage tags
(git commit and its dirty flag over the code, the params hash, the DVC hash of the data)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml

from components.schema import StrictConfig

ROOT_ENV = "GENPIPE_ROOT"


def repo_root() -> Path:
    """Stages run from the repo root (as DVC runs them); GENPIPE_ROOT overrides."""
    return Path(os.environ.get(ROOT_ENV, os.getcwd())).resolve()


def absolute(path: str | Path) -> str:
    """An absolute path (workers change directory); URIs such as s3:// pass through."""
    s = str(path)
    if "://" in s:
        return s
    p = Path(s).expanduser()
    return str(p if p.is_absolute() else repo_root() / p)


def params_hash(sections: dict[str, StrictConfig]) -> str:
    """sha256 over the resolved sections, stable across key order."""
    blob = json.dumps({k: v.model_dump(mode="json") for k, v in sorted(sections.items())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


#: What a stage's result depends on besides its data: the code and the stage definitions and params.
#: The stages' own tracked outputs (dvc.lock, reports/, data/ and models/ pointers) are not in it.
CODE_PATHS = ("components", "pipelines", "params.yaml", "dvc.yaml", "pyproject.toml")


def git_commit(paths: tuple[str, ...] = CODE_PATHS) -> str:
    """HEAD's sha, with `-dirty` when a file under `paths` differs from it (untracked .py files too)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10
        )
        sha = out.stdout.strip()
        return f"{sha}{'-dirty' if sha and code_dirty(paths) else ''}" if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_dirty(paths: tuple[str, ...] = CODE_PATHS) -> bool:
    """Whether a tracked file under `paths` is modified, or an unignored file there is untracked."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return any(line.strip() for line in status.splitlines())


def dvc_data_hash(deps: list[str]) -> str:
    """DVC's recorded md5 of each data dep (from dvc.lock outs of the stages that made them)."""
    if not deps:
        return ""
    lock = repo_root() / "dvc.lock"
    found = _dvc_outs(lock, lock.stat().st_mtime_ns) if lock.is_file() else {}
    return ",".join(f"{d}:{found.get(d, 'untracked')}" for d in deps)


def dvc_out(path: str) -> dict | None:
    """dvc.lock's record of the tracked output `path` (md5, size, nfiles), None when it has none."""
    lock = repo_root() / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = (out for stage in stages.values() for out in stage.get("outs", []))
    return next((out for out in outs if out.get("path") == path), None)


@functools.lru_cache(maxsize=4)
def _dvc_outs(lock: Path, mtime_ns: int) -> dict[str, str]:
    """{out path: md5} of every stage in dvc.lock; parsed once per version of the file (a stage asks thrice)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 5x faster on a 50 kB lock file
    stages = (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {})
    outs = (out for stage in stages.values() for out in stage.get("outs", []))
    return {out["path"]: out.get("md5", "") for out in outs if "path" in out}
