"""Where a stage runs and what it ran on: the repository root, absolute paths, and the lineage tags
(git commit and its dirty flag over the code, the params hash, the DVC hash of the data, the DVC
experiment).

A queued or `--temp` DVC experiment runs its stages in a throwaway copy of the repository
(`.dvc/tmp/exps/tmpXXXX`): the stage's inputs and outputs are that copy's (`repo_root`), but what
outlives the run, the default MLflow store and checkpoints, belongs to the user's repository
(`user_root`), which DVC names in DVC_ROOT.
"""

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


#: Set by DVC for every stage it runs: the user's repository, also when the stage runs in an
#: experiment's temporary copy (dvc/repo/experiments/queue/base.py: "not an executor tempdir root").
DVC_ROOT_ENV = "DVC_ROOT"
#: DVC's temporary copies of a repository for queued and `--temp` experiments, under its root.
DVC_TEMP_COPIES = Path(".dvc", "tmp", "exps")


def user_root() -> Path:
    """The user's repository: where the default MLflow store and checkpoints live.

    It is `repo_root()`, except in a DVC experiment's temporary copy, which sits under the user's
    repository (`<DVC_ROOT>/.dvc/tmp/exps/`); there it is DVC_ROOT. A DVC_ROOT that does not hold
    the working directory (a variable left over in the shell) is ignored.
    """
    here = repo_root()
    named = os.environ.get(DVC_ROOT_ENV)
    if not named:
        return here
    dvc_root = Path(named).resolve()
    return dvc_root if here.is_relative_to(dvc_root / DVC_TEMP_COPIES) else here


def absolute(path: str | Path, *, root: Path | None = None) -> str:
    """An absolute path (workers change directory), relative ones from `root` (default: the repo root);
    URIs such as s3:// pass through."""
    s = str(path)
    if "://" in s:
        return s
    p = Path(s).expanduser()
    return str(p if p.is_absolute() else (root or repo_root()) / p)


def resolve_storage(path: str) -> str:
    """`train.storage_path` made absolute: a relative one is in the user's repository (`user_root`),
    so checkpoints outlive a DVC experiment's temporary copy and a later run can resume from them."""
    return absolute(path, root=user_root())


#: The DVC experiment a stage runs in: tag name -> the variable DVC sets for each of its stages.
EXPERIMENT_TAGS = {"dvc.experiment": "DVC_EXP_NAME", "dvc.baseline_rev": "DVC_EXP_BASELINE_REV"}


def experiment_tags() -> dict[str, str]:
    """{dvc.experiment, dvc.baseline_rev} when DVC runs this stage for an experiment (`dvc exp run`,
    queued or not), else {}: they find the MLflow runs and model versions of one experiment."""
    return {tag: os.environ[env] for tag, env in EXPERIMENT_TAGS.items() if os.environ.get(env)}


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
    return ",".join(f"{d}:{(dvc_out(d) or {}).get('md5', 'untracked')}" for d in deps)


def dvc_out(path: str) -> dict | None:
    """dvc.lock's record of the tracked output `path` (md5, size, nfiles), None when it has none."""
    lock = repo_root() / "dvc.lock"
    if not lock.is_file():
        return None
    record = _dvc_outs(lock, lock.stat().st_mtime_ns).get(path)
    return dict(record) if record is not None else None  # the parse is cached: hand out a copy


@functools.lru_cache(maxsize=4)
def _dvc_outs(lock: Path, mtime_ns: int) -> dict[str, dict]:
    """{out path: its record} of every stage in dvc.lock; parsed once per version of the file (a stage
    asks several times)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 5x faster on a 50 kB lock file
    stages = (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {})
    outs = (out for stage in stages.values() for out in stage.get("outs", []))
    return {out["path"]: out for out in outs if "path" in out}
