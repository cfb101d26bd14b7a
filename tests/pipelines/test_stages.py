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

from components.catalog import GENERATORS
from components.registry.registry import list_versions, version_settings
from pipelines.ray_start import LOCAL_RAY_ENV

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
    "train_diffusion": {
        variant: {
            "model": {
                "objective": "edm",
                "backbone": {
                    "channels": 8,
                    "channel_mult": [1, 2],
                    "num_res_blocks": 1,
                    "attention_levels": [],
                },
            },
            "sampling": {"sampler": "heun", "steps": 4, "discretization": "karras", "guidance": 1.5},
            "loop": {
                "steps": 12,
                "batch_size": 32,
                "lr": 0.002,
                "checkpoint_every": 6,
                "log_every": 6,
                "ema_decay": 0.9,
            },
        }
        for variant in ("pixel", "latent")
    },
    "train_prior": {
        kind: {
            "model": {"kind": kind, kind: {"layers": 1, "heads": 2, "width": 32}},
            "sampling": {"guidance": 1.5, **({"steps": 4} if kind == "maskgit" else {})},
            "loop": {"steps": 12, "batch_size": 32, "lr": 0.003, "checkpoint_every": 6, "log_every": 6},
        }
        for kind in ("gpt", "maskgit")
    },
    "train_zoo": {
        variant: {
            "model": model,
            **sampling,
            "loop": {"steps": 10, "batch_size": 32, "lr": 0.002, "checkpoint_every": 5, "log_every": 5},
        }
        for variant, model, sampling in (
            (
                "vae",
                {"channels": 8, "channel_mult": [1, 2], "latent_dim": 4, "beta": 2.0, "prior": "fitted"},
                {},
            ),
            (
                "gan",
                {"g_channels": 8, "d_channels": 8, "latent_dim": 8, "mode_seeking": 0.1},
                {"sampling": {"truncation": 2.0}},
            ),
            ("wgan", {"loss": "wgan_gp", "g_channels": 8, "d_channels": 8, "n_critic": 2}, {}),
            (
                "flow",
                {"levels": 2, "steps_per_level": 2, "hidden_channels": 8},
                {"sampling": {"temperature": 0.6}},
            ),
            ("pixelcnn", {"channels": 8, "layers": 2, "first_kernel": 3, "kernel": 3}, {}),
        )
    },
    "evaluate": {"num_samples": 40, "batch_size": 25, "grid_columns": 3, "threads": 1},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    old = {
        k: os.environ.get(k) for k in ("GENPIPE_ROOT", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", *LOCAL_RAY_ENV)
    }
    os.environ["GENPIPE_ROOT"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(LOCAL_RAY_ENV)  # as a stage's own local instance runs (pipelines/ray_start.py)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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


def _stage(name: str, root: Path, **args: str) -> None:
    import importlib

    importlib.import_module(f"pipelines.{name}").main(params=root / "params.yaml", **args)


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
    lineage = versions[0]["tags"]  # the Ray run that trained it, as for every generator
    assert lineage["ray_run_name"].startswith("train_evaluator-")
    run_dir = Path(lineage["ray_storage_path"]) / lineage["ray_run_name"]  # the driver's own tags lead
    assert run_dir.is_absolute() and list(run_dir.glob("checkpoint_*")), run_dir  # to its checkpoints
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
    # What the stages hand to fit(): a split this small is plain arrays (no Ray Data), the same rows.
    from components.data.tokens import token_training_split

    columns = token_training_split(workspace / "data/tokens", "test")
    assert isinstance(columns, dict) and sorted(columns) == ["label", "latent", "tokens"]
    np.testing.assert_array_equal(columns["tokens"], test["tokens"])
    assert columns["tokens"].dtype == np.int64 and columns["latent"].dtype == np.float32


@pytest.mark.parametrize("variant", ["pixel", "latent"])
def test_train_diffusion(workspace: Path, variant: str):
    from components.generators import load_generator

    _stage("train_diffusion", workspace, variant=variant)
    model_dir = workspace / f"models/diffusion_{variant}"
    metrics = json.loads((workspace / f"reports/train_diffusion_{variant}.json").read_text())
    assert math.isfinite(metrics["val/loss"]) and metrics["train_seconds"] > 0
    generator = load_generator(model_dir)
    assert generator.image_shape == (1, 16, 16) and generator.num_classes == 10
    assert generator.default_options["steps"] == 4 and generator.default_options["guidance"] == 1.5
    x = generator.sample(torch.tensor([0, 9]), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    if variant == "latent":
        assert metrics["compression"] == 0.5  # 4x4x8 latents for 16x16x1 images
        assert (model_dir / "tokenizer/model.safetensors").is_file()  # carried: loads from this folder alone
    name = {"pixel": "genpipe-diffusion", "latent": "genpipe-latent-diffusion"}[variant]
    versions = list_versions(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", name=name)
    assert len(versions) == 1
    settings = version_settings(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", name=name, version="1")
    tags = {**settings, **versions[0]["tags"]}  # settings: parameters of the logged model
    assert (tags["objective"], tags["sampler"], tags["steps"], tags["guidance"]) == (
        "edm",
        "heun",
        "4",
        "1.5",
    )
    assert tags["ray_run_name"].startswith(f"train_diffusion-{variant}-")


def test_train_diffusion_bad_variant(workspace: Path):
    with pytest.raises(ValueError, match="unknown train_diffusion variant 'voxel'; valid: pixel, latent"):
        _stage("train_diffusion", workspace, variant="voxel")


@pytest.mark.parametrize("kind", ["gpt", "maskgit"])
def test_train_prior(workspace: Path, kind: str):
    from components.generators import load_generator

    _stage("train_prior", workspace, variant=kind)
    model_dir = workspace / f"models/prior_{kind}"
    metrics = json.loads((workspace / f"reports/train_prior_{kind}.json").read_text())
    assert math.isfinite(metrics["val/loss"]) and 0 <= metrics["val/accuracy"] <= 1
    generator = load_generator(model_dir)
    assert generator.image_shape == (1, 16, 16) and generator.num_classes == 10
    assert generator.default_options["guidance"] == 1.5
    x = generator.sample(torch.tensor([3, 4, 5]), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert (model_dir / "tokenizer/model.safetensors").is_file()  # the two stages travel together
    versions = list_versions(
        tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", name=f"genpipe-prior-{kind}"
    )
    settings = version_settings(  # parameters of the logged model
        tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", name=f"genpipe-prior-{kind}", version="1"
    )
    assert len(versions) == 1 and settings["prior"] == kind
    assert settings["guidance"] == "1.5" and versions[0]["tags"]["tokenizer_version"] == "1"


def test_train_prior_refuses_stale_tokens(workspace: Path):
    """Tokens encoded by another tokenizer than the one the prior would carry: one line, before training."""
    from components.data.tokens import check_tokenizer

    meta = json.loads((workspace / "data/tokens/meta.json").read_text())
    check_tokenizer(meta, workspace / "models/tokenizer")  # the real pair passes
    meta["tokenizer"]["model_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="run `dvc repro encode`"):
        check_tokenizer(meta, workspace / "models/tokenizer")


ZOO_TAGS = {  # the registered version's family-specific tags under TINY
    "vae": {"family": "vae", "beta": "2.0", "latent_dim": "4", "prior": "fitted", "temperature": "1.0"},
    "gan": {"family": "gan", "loss": "ns", "n_critic": "1", "truncation": "2.0"},
    "wgan": {"family": "wgan", "loss": "wgan_gp", "n_critic": "2", "gp_weight": "10.0"},
    "flow": {"family": "flow", "levels": "2", "steps_per_level": "2", "temperature": "0.6"},
    "pixelcnn": {"family": "pixelcnn", "layers": "2", "channels": "8", "temperature": "1.0"},
}


@pytest.mark.parametrize("variant", list(ZOO_TAGS))
def test_train_zoo(workspace: Path, variant: str):
    from components.generators import LikelihoodGenerator, load_generator

    _stage("train_zoo", workspace, variant=variant)
    metrics = json.loads((workspace / f"reports/train_{variant}.json").read_text())
    assert metrics["train_seconds"] > 0 and all(math.isfinite(v) for v in metrics.values())
    assert any(k.startswith("val/") for k in metrics)
    assert (workspace / f"reports/plots/train_{variant}.csv").is_file()
    generator = load_generator(workspace / f"models/{variant}")
    assert generator.image_shape == (1, 16, 16) and generator.num_classes == 10
    x = generator.sample(torch.tensor([0, 7, 9]), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    likelihood = variant in ("vae", "flow", "pixelcnn")
    assert isinstance(generator, LikelihoodGenerator) == likelihood
    if variant == "vae":  # `prior: fitted`: each class's Gaussian fitted to the train codes, then exported
        means = generator.net.prior_mean[:10]
        assert means.abs().sum() > 0 and not torch.allclose(means[0], means[1])
    if likelihood:
        bpd = generator.bits_per_dim(x, generator=torch.Generator().manual_seed(0))
        assert bpd.shape == (3,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    versions = list_versions(tracking_uri=uri, name=f"genpipe-{variant}")
    assert len(versions) == 1
    settings = version_settings(tracking_uri=uri, name=f"genpipe-{variant}", version="1")
    tags = {**settings, **versions[0]["tags"]}  # settings: parameters of the logged model
    assert {k: tags.get(k) for k in ZOO_TAGS[variant]} == ZOO_TAGS[variant]
    assert tags["ray_run_name"].startswith(f"train_zoo-{variant}-")


def test_train_zoo_bad_variant(workspace: Path):
    with pytest.raises(ValueError, match="unknown train_zoo variant 'vqvae'; valid: vae, gan, wgan"):
        _stage("train_zoo", workspace, variant="vqvae")


MODEL_NAMES = {m.name: m.registered for m in GENERATORS}


@pytest.mark.parametrize("model", list(MODEL_NAMES))
def test_evaluate(workspace: Path, model: str):
    from components.registry.registry import version_by_alias

    _stage("evaluate", workspace, model=model)
    metrics = json.loads((workspace / f"reports/evaluate/{model}.json").read_text())
    for key in ("fid", "fid_over_floor", "cond_accuracy", "precision", "recall", "images_per_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["num_samples"] == 40
    if model.startswith("diffusion"):
        assert metrics["nfe"] == 7  # heun, 4 steps: 2*4-1
    if model in ("vae", "flow", "pixelcnn"):  # the likelihood families, on the test split
        assert 0 < metrics["bits_per_dim"] < 20
    assert 0 <= metrics["cond_accuracy"] <= 1 and metrics["fid"] > 0
    png = workspace / f"reports/evaluate/{model}.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    width, height = Image.open(png).size
    assert height > width  # ten class rows of three columns
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    name = MODEL_NAMES[model]
    version = version_by_alias(tracking_uri=uri, name=name, alias="challenger")
    assert version == "1"
    run_id = _client(workspace).get_model_version(name, version).run_id
    assert _client(workspace).get_run(run_id).data.metrics["eval/fid"] == pytest.approx(metrics["fid"])


def test_evaluate_is_reproducible_and_options_override(workspace: Path):
    _stage("evaluate", workspace, model="diffusion_pixel")  # its own first run: no other test's report
    first = json.loads((workspace / "reports/evaluate/diffusion_pixel.json").read_text())
    _stage("evaluate", workspace, model="diffusion_pixel")
    again = json.loads((workspace / "reports/evaluate/diffusion_pixel.json").read_text())
    assert again["fid"] == first["fid"] and again["cond_accuracy"] == first["cond_accuracy"]  # fixed seeds
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["evaluate"]["options"] = {"diffusion_pixel": {"sampler": "euler", "steps": 3}}
    other = workspace / "params-euler.yaml"
    other.write_text(yaml.safe_dump(raw))
    import importlib

    importlib.import_module("pipelines.evaluate").main(params=other, model="diffusion_pixel")
    euler = json.loads((workspace / "reports/evaluate/diffusion_pixel.json").read_text())
    assert euler["nfe"] == 3 and euler["fid"] != first["fid"]
    raw["evaluate"]["options"] = {"diffusion_pixel": {"sampler": "ddpm"}}
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="sampler=ddpm"):
        importlib.import_module("pipelines.evaluate").main(params=other, model="diffusion_pixel")


def test_report(workspace: Path):
    _stage("report", workspace)
    summary = json.loads((workspace / "reports/evaluate.json").read_text())
    assert set(summary) == set(MODEL_NAMES.values())
    assert summary["genpipe-diffusion"]["train_seconds"] > 0
    table = (workspace / "reports/results.md").read_text().splitlines()
    assert table[0].startswith("| family | model | FD |") and len(table) == 2 + len(MODEL_NAMES)


def test_gpu_train_trains_and_judges_each_family_without_ray_mlflow_or_dvc(workspace: Path, tmp_path: Path):
    """benchmarks/gpu_train.py, the run a lent GPU machine (PyTorch, no Ray, MLflow or DVC) makes on a
    workspace: each family built as its stage builds it, trained, exported, judged. On the CPU here."""
    import subprocess
    import sys
    import tarfile

    from components.generators import load_generator

    families = ("diffusion_pixel", "diffusion_latent", "prior_gpt", "prior_maskgit")
    driver = (
        "import sys\n"
        "for name in ('ray', 'mlflow', 'dvc'): sys.modules[name] = None  # as on the GPU machine\n"
        "from benchmarks.gpu_train import main\n"
        f"for model in {families!r}:\n"
        f"    main(['--workspace', {str(workspace)!r}, '--model', model, '--device', 'cpu', '--steps', '2',\n"
        f"          '--num-samples', '12', '--judge', '{{}}', '--out', {str(tmp_path)!r}])\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", driver], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    bare = tmp_path / "bare"  # a folder without the stages' outputs: one line naming what it lacks
    refused = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_train", "--workspace", str(bare), "--model", "prior_gpt"]
        + ["--device", "cpu", "--steps", "1", "--out", str(tmp_path / "none")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and not (tmp_path / "none").exists()
    assert refused.stderr.strip().splitlines() == [
        f"gpu_train: {bare} lacks params.yaml, data/processed, models/evaluator, data/tokens, "
        "models/tokenizer: run `genpipe repro` there first"
    ]
    for model in families:
        report = json.loads((tmp_path / f"{model}.json").read_text())
        assert report["train"]["steps"] == 2 and math.isfinite(report["train"]["val/loss"])
        (judged,) = report["judged"]
        assert (
            judged["n"] == 12
            and math.isfinite(judged["fid_over_floor"])
            and 0 <= judged["cond_accuracy"] <= 1
        )
        assert (tmp_path / f"{model}.png").read_bytes()[:4] == b"\x89PNG"
        with tarfile.open(tmp_path / f"{model}.tar") as tar:
            tar.extractall(tmp_path / "exports", filter="data")
        generator = load_generator(tmp_path / "exports" / model)  # `genpipe evaluate` loads it as its own
        assert generator.image_shape == (1, 16, 16) and generator.num_classes == 10
        x = generator.sample(torch.tensor([0, 9]), generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
