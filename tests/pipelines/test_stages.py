"""Stage smoke tests: each stage's driver for a few steps on real Ray and a real MLflow store.

The stages run in this process, in order, inside one workspace (GENPIPE_ROOT), sharing one local
Ray instance, as `make run` shares one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient

from components.registry.registry import list_versions

TINY = {
    "train": {"storage_path": ".genpipe/ray_results"},
    "ray": {"num_cpus": 2},
    "prepare": {"source": "builtin:digits", "image_size": 16},
    "train_evaluator": {
        "model": {"widths": [16, 32], "feature_dim": 32},
        "loop": {
            "steps": 40,
            "batch_size": 32,
            "lr": 0.003,
            "warmup_steps": 5,
            "val_every": 20,
            "checkpoint_every": 20,
            "log_every": 10,
        },
    },
    "train_tokenizer": {
        "model": {
            "autoencoder": {
                "in_channels": 1,
                "channels": 16,
                "channel_mult": [1, 2, 2],
                "downsample_factor": 4,
                "num_res_blocks": 1,
                "z_channels": 8,
                "attention": False,
            },
            "quantizer": {"kind": "vq", "codebook_size": 32, "ema": True},
            "loss": {
                "perceptual_weight": 0.1,
                "disc": {"weight": 0.1, "start_step": 10, "layers": 2, "channels": 16},
            },
        },
        "loop": {
            "steps": 20,
            "batch_size": 32,
            "lr": 0.001,
            "betas": [0.5, 0.9],
            "checkpoint_every": 10,
            "log_every": 5,
        },
        "num_grid": 8,
    },
    "encode": {"batch_size": 128},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    old = {k: os.environ.get(k) for k in ("GENPIPE_ROOT", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    os.environ["GENPIPE_ROOT"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _runs(root: Path, stage: str):
    client = _client(root)
    exp = client.get_experiment_by_name("genpipe")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`genpipe.stage` = '{stage}'")


def _stage(name: str, root: Path) -> None:
    import importlib

    importlib.import_module(f"pipelines.{name}").main(params=root / "params.yaml")


def test_prepare(workspace: Path):
    _stage("prepare", workspace)
    metrics = json.loads((workspace / "reports/prepare.json").read_text())
    assert metrics["num_train"] + metrics["num_val"] + metrics["num_test"] == 1797
    run = _runs(workspace, "prepare")[0]
    assert run.data.metrics["num_classes"] == 10
    assert run.data.tags["params_hash"] and run.data.tags["git_commit"]


def test_train_evaluator(workspace: Path):
    _stage("train_evaluator", workspace)
    metrics = json.loads((workspace / "reports/train_evaluator.json").read_text())
    assert 0.3 < metrics["test_accuracy"] <= 1.0  # 40 steps of a tiny CNN: far above chance (0.1)
    assert math.isfinite(metrics["fid_floor"]) and metrics["fid_floor"] >= 0
    for name in ("model.safetensors", "config.json", "test_stats.safetensors", "train_stats.safetensors"):
        assert (workspace / "models/evaluator" / name).is_file()
    runs = _runs(workspace, "train_evaluator")
    assert len(runs) == 1
    history = _client(workspace).get_metric_history(runs[0].info.run_id, "main/loss")
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # every logged step once
    assert runs[0].data.tags["dvc_data_hash"].startswith("data/processed")
    versions = list_versions(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", name="genpipe-evaluator")
    assert len(versions) == 1 and versions[0]["tags"]["params_hash"] == runs[0].data.tags["params_hash"]
    curves = (workspace / "reports/plots/train_evaluator.csv").read_text().splitlines()
    assert curves[0].startswith("step,") and len(curves) > 3
    assert "final/" not in curves[0] and curves[1].startswith("10,")  # per-step rows only
    assert (workspace / "reports/plots/train_evaluator.png").read_bytes()[:4] == b"\x89PNG"
    logged = _client(workspace).list_artifacts(runs[0].info.run_id, "plots")
    assert [a.path for a in logged] == ["plots/train_evaluator.png"]


def test_train_evaluator_rerun_resumes_finished_run(workspace: Path):
    """Same params: the Ray run is found finished, nothing retrains, the export is the same."""
    before = (workspace / "models/evaluator/model.safetensors").read_bytes()
    _stage("train_evaluator", workspace)
    assert (workspace / "models/evaluator/model.safetensors").read_bytes() == before


def test_train_tokenizer(workspace: Path):
    _stage("train_tokenizer", workspace)
    metrics = json.loads((workspace / "reports/train_tokenizer.json").read_text())
    for key in ("psnr", "rfid", "codebook_usage", "perplexity", "ssim"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["psnr"] > 5
    assert (workspace / "reports/train_tokenizer_recon.png").stat().st_size > 0
    assert (workspace / "models/tokenizer/model.safetensors").is_file()
    versions = list_versions(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", name="genpipe-tokenizer")
    assert len(versions) == 1 and len(versions[0]["tags"]["model_sha256"]) == 64


def test_encode(workspace: Path):
    from components.data.tokens import read_token_meta, read_tokens

    _stage("encode", workspace)
    meta = read_token_meta(workspace / "data/tokens")
    assert meta["grid"] == [4, 4] and meta["codebook_size"] == 32
    assert meta["tokenizer"]["version"] == "1"
    prepared = json.loads((workspace / "data/processed/meta.json").read_text())
    assert meta["counts"] == prepared["counts"]
    test = read_tokens(workspace / "data/tokens", "test")
    assert test["tokens"].shape == (prepared["counts"]["test"], 4, 4)
    assert test["tokens"].min() >= 0 and test["tokens"].max() < 32
    assert test["latent"].shape[1:] == (meta["latent_channels"], 4, 4)
    # The Ray Data view the priors and latent diffusion train on holds the same rows, shaped.
    from components.data.tokens import ray_token_dataset

    batch = next(
        iter(ray_token_dataset(workspace / "data/tokens", "test").iter_torch_batches(batch_size=10**6))
    )
    order = np.lexsort(test["latent"].reshape(len(test["latent"]), -1).T)
    got = np.lexsort(batch["latent"].numpy().reshape(len(batch["latent"]), -1).T)
    np.testing.assert_array_equal(batch["tokens"].numpy()[got], test["tokens"][order])
    np.testing.assert_array_equal(batch["label"].numpy()[got], test["label"][order])
    assert batch["tokens"].dtype == torch.int64 and batch["latent"].dtype == torch.float32
