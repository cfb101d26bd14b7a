"""End to end: `dvc repro` in a fresh git repo holding this project, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow


def _set(params: Path, section: str, **values) -> None:
    raw = yaml.safe_load(params.read_text())
    raw[section].update(values)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_repro_runs_noops_and_reruns_on_param_change(repo_copy: Path):
    out = run(["dvc", "repro", "prepare"], repo_copy).stdout
    assert "Running stage 'prepare'" in out
    metrics = json.loads((repo_copy / "reports/prepare.json").read_text())
    assert metrics["num_classes"] == 10.0
    assert metrics["num_train"] + metrics["num_val"] + metrics["num_test"] == 1797
    meta = json.loads((repo_copy / "data/processed/meta.json").read_text())
    assert meta["image_size"] == 16 and meta["channels"] == 1
    assert (repo_copy / "reports/prepare_samples.png").stat().st_size > 0
    assert (repo_copy / "mlflow.db").is_file()

    again = run(["dvc", "repro", "prepare"], repo_copy).stdout
    assert "Running stage" not in again

    _set(repo_copy / "params.yaml", "prepare", image_size=12)
    rerun = run(["dvc", "repro", "prepare"], repo_copy).stdout
    assert "Running stage 'prepare'" in rerun
    assert json.loads((repo_copy / "data/processed/meta.json").read_text())["image_size"] == 12

    shown = run(["dvc", "metrics", "show", "--json"], repo_copy).stdout
    assert "num_train" in shown
