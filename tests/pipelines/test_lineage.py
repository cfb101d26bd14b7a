"""Lineage tags on registered versions, written by the stages' own code (`stage_run`, `finish`), read back
by `genpipe models --lineage`: on a sqlite file and through `mlflow server` over PostgreSQL."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from components.config import load_stage
from components.io import save_model
from components.registry.registry import record_evaluation
from pipelines.lineage import (
    DVC_ROOT_ENV,
    EXPERIMENT_TAGS,
    ROOT_ENV,
    absolute,
    experiment_tags,
    git_commit,
    params_hash,
    repo_root,
    resolve_storage,
    user_root,
)
from pipelines.promote import LINEAGE_TAGS, lineage
from pipelines.runtime import stage_run
from pipelines.training import finish
from tests.conftest import REPO

DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
JUDGE = hashlib.sha256(b"the evaluator's weights").hexdigest()


def stage_root(root: Path, tracking_uri: str) -> Path:
    """A repository as the stages see it: a git commit, a dvc.lock naming the data, the shipped params."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = tracking_uri
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    lock = {"stages": {"prepare": {"outs": [{"path": "data/processed", "md5": DATA_MD5}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    for cmd in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
    ):
        subprocess.run(["git", *cmd], cwd=root, check=True, capture_output=True)
    return root


def train_stage(root: Path, stage: str, *, family: str, seed: int) -> tuple[str, dict]:
    """One training stage's MLflow side, as the drivers do it: its run, curves, a tiny model registered."""
    sections = load_stage(root / "params.yaml", stage)
    model_dir = root / "models" / f"{family}-{seed}"
    save_model(model_dir, {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))}, {})
    with stage_run(stage, sections, data_deps=["data/processed"]) as run:
        for step in (10, 20, 30):
            run.log_metrics({"train/loss": 1.0 / step + seed}, step=step)
        version = finish(
            run,
            family=family,
            model_dir=model_dir,
            metrics={"val/loss": 0.5 + seed},
            metrics_path=root / "reports" / f"{stage}.json",
            curves_path=root / "reports" / "plots" / f"{stage}.csv",
            register_model=True,
            tags={"ray_run_name": f"{stage}-{seed:016x}", "ray_storage_path": str(root / ".genpipe")},
        )
    return version, sections


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_lineage_tags_present_and_right(backend: str, request, tmp_path: Path, monkeypatch):
    uri = (
        request.getfixturevalue("postgres_registry")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = stage_root(tmp_path, uri)
    version, sections = train_stage(root, "train_evaluator", family="evaluator", seed=0)
    record_evaluation(  # what `evaluate` adds: the judge its figures come from
        tracking_uri=uri,
        name="genpipe-evaluator",
        version=version,
        metrics={"fid": 1.5},
        tags={"eval.evaluator_sha256": JUDGE},
        artifact=root / "reports" / "plots" / "train_evaluator.png",
    )
    lines = lineage(params=root / "params.yaml", target="genpipe-evaluator@challenger")
    got = dict(line.strip().split(": ", 1) for line in lines[1:])
    assert lines[0].startswith(f"genpipe-evaluator v{version} aliases=challenger run=")
    assert list(got) == list(LINEAGE_TAGS)
    assert got == {
        "genpipe.stage": "train_evaluator",
        "git_commit": git_commit(),
        "dvc_data_hash": f"data/processed:{DATA_MD5}",
        "params_hash": params_hash(sections),
        "ray_run_name": "train_evaluator-0000000000000000",
        "ray_storage_path": str(root / ".genpipe"),
        "eval.evaluator_sha256": JUDGE,
        "model_sha256": hashlib.sha256(
            (root / "models/evaluator-0/model.safetensors").read_bytes()
        ).hexdigest(),
        # a generator's pyfunc model adds these (tests/components/registry/test_pyfunc.py); the
        # evaluator stays a plain folder
        "weights_sha256": "-",
        "code_sha256": "-",
        "tokenizer_sha256": "-",
    }
    assert len(got["git_commit"]) == 40  # a real commit of the stage_root repository, not "unknown"


def test_a_dvc_experiments_temporary_copy_records_into_the_users_repository(tmp_path: Path, monkeypatch):
    """DVC runs a queued or --temp experiment in <repo>/.dvc/tmp/exps/tmpXXXX and names <repo> in
    DVC_ROOT: what outlives the run (store, checkpoints) goes to <repo>, the stage's files stay its own."""
    user = tmp_path / "repo"
    copy = user / ".dvc" / "tmp" / "exps" / "tmpa9zv5fdq"
    copy.mkdir(parents=True)
    monkeypatch.setenv(ROOT_ENV, str(copy))
    monkeypatch.delenv(DVC_ROOT_ENV, raising=False)
    assert user_root() == copy  # no DVC: the repository is where the stage runs
    monkeypatch.setenv(DVC_ROOT_ENV, str(user))
    assert user_root() == user and repo_root() == copy
    assert resolve_storage(".genpipe/ray_results") == str(user / ".genpipe/ray_results")
    assert resolve_storage("s3://bucket/ray") == "s3://bucket/ray"  # an explicit place wins
    assert resolve_storage(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")
    assert absolute("data/processed") == str(copy / "data/processed")  # the stage's inputs: the copy's
    monkeypatch.setenv(ROOT_ENV, str(user))  # `dvc repro` / `dvc exp run` in the workspace itself
    assert user_root() == user
    monkeypatch.setenv(DVC_ROOT_ENV, str(tmp_path / "elsewhere"))  # left over: holds no working dir
    assert user_root() == user


def test_experiment_tags_name_dvcs_experiment_only_inside_one(monkeypatch):
    for env in EXPERIMENT_TAGS.values():
        monkeypatch.delenv(env, raising=False)
    assert experiment_tags() == {}  # `dvc repro`, or a stage run by hand
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-1")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    assert experiment_tags() == {"dvc.experiment": "sweep-1", "dvc.baseline_rev": "a" * 40}
