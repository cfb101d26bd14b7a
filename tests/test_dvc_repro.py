"""End to end: `dvc repro` in a fresh git repo holding this project, as a user runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow


def _set(params: Path, section: str, **values) -> None:
    raw = yaml.safe_load(params.read_text())
    raw[section].update(values)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def _set_nested(params: Path, *keys: str, **values) -> None:
    raw = yaml.safe_load(params.read_text())
    node = raw
    for key in keys:
        node = node[key]
    node.update(values)
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

    # The default remote (a folder beside the repo) works out of the box.
    run(["dvc", "push", "prepare"], repo_copy)
    assert any((repo_copy.parent / "genpipe-dvc-remote").rglob("*")), "dvc push wrote nothing"
    shutil.rmtree(repo_copy / "data/processed")
    shutil.rmtree(repo_copy / ".dvc/cache")
    run(["dvc", "pull", "prepare"], repo_copy)
    assert json.loads((repo_copy / "data/processed/meta.json").read_text())["image_size"] == 12
    assert "Running stage" not in run(["dvc", "repro", "prepare"], repo_copy).stdout


@pytest.mark.timeout(2400)  # fourteen training stages and nine judges, each its own process
def test_full_pipeline_with_tiny_params(repo_copy: Path):
    """The whole DAG on tiny params: every stage runs, a re-run does nothing, one knob re-runs one stage."""
    from tests.pipelines.test_stages import TINY

    params = repo_copy / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    for section, value in TINY.items():
        if section not in ("train", "ray", "prepare"):
            raw[section] = value
    raw["ray"]["num_cpus"] = 2
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "commit", "-qam", "tiny params"], repo_copy)

    out = run(["dvc", "repro"], repo_copy).stdout
    stages = ["prepare", "train_evaluator", "train_tokenizer", "encode", "report"]
    stages += [f"train_diffusion@{v}" for v in ("pixel", "latent")] + [
        f"train_prior@{v}" for v in ("gpt", "maskgit")
    ]
    zoo = ("vae", "gan", "wgan", "flow", "pixelcnn")
    stages += [f"train_zoo@{v}" for v in zoo]
    stages += [
        f"evaluate@{m}" for m in ("diffusion_pixel", "diffusion_latent", "prior_gpt", "prior_maskgit", *zoo)
    ]
    for stage in stages:
        assert f"Running stage '{stage}'" in out, stage
    assert json.loads((repo_copy / "reports/train_evaluator.json").read_text())["test_accuracy"] > 0.3
    tokenizer = json.loads((repo_copy / "reports/train_tokenizer.json").read_text())
    assert 0 < tokenizer["codebook_usage"] <= 1
    assert json.loads((repo_copy / "data/tokens/meta.json").read_text())["grid"] == [4, 4]
    models = run(["genpipe", "models"], repo_copy).stdout
    assert "genpipe-evaluator" in models and "genpipe-tokenizer" in models

    summary = json.loads((repo_copy / "reports/evaluate.json").read_text())
    assert {
        "genpipe-diffusion",
        "genpipe-latent-diffusion",
        "genpipe-prior-gpt",
        "genpipe-prior-maskgit",
    } <= set(summary)

    assert "Running stage" not in run(["dvc", "repro"], repo_copy).stdout
    # An evaluation knob re-runs the judges alone, not the training stages.
    _set(params, "evaluate", seed=1)
    rerun = run(["dvc", "repro"], repo_copy).stdout
    assert "Running stage 'evaluate@diffusion_pixel'" in rerun and "Running stage 'report'" in rerun
    assert "Running stage 'train_diffusion@pixel'" not in rerun
    # One variant's knob re-runs that variant (and what reads its model) only.
    _set_nested(params, "train_diffusion", "latent", "loop", steps=10)
    rerun = run(["dvc", "repro"], repo_copy).stdout
    assert (
        "Running stage 'train_diffusion@latent'" in rerun
        and "Running stage 'train_diffusion@pixel'" not in rerun
    )
    assert "Running stage 'evaluate@diffusion_pixel'" not in rerun
    _set(params, "encode", batch_size=64)
    rerun = run(["dvc", "repro"], repo_copy).stdout
    assert "Running stage 'encode'" in rerun and "Running stage 'train_tokenizer'" not in rerun
    shown = run(["dvc", "metrics", "show"], repo_copy).stdout
    assert "reports/train_tokenizer.json" in shown and "reports/evaluate.json" in shown
