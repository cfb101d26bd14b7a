"""The diffusion sampler benchmark's quick path on a tiny fixture (no models/ needed), and its NFE search."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import run
from benchmarks.diffusion import (
    COLUMNS,
    curves,
    load_ddpm,
    main,
    nfe_to_reach,
    train_ddpm,
)
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.data.readers import ShardDataset
from components.diffusion.config import DiffusionConfig, SamplingConfig
from components.diffusion.generator import export
from components.diffusion.precond import build_denoiser
from components.evaluation.evaluator import Evaluator, EvaluatorConfig, save_evaluator
from components.evaluation.reference import compute_reference, save_reference

TINY = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": []}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict[str, Path]:
    """Digits, an untrained tiny evaluator with its statistics, a tiny edm model, tiny params."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "processed"
    build_dataset(PrepareConfig(), data, log=lambda *_: None)
    torch.manual_seed(0)
    evaluator = Evaluator(EvaluatorConfig(widths=(8,), feature_dim=8), in_channels=1, num_classes=10).eval()
    save_evaluator(evaluator, root / "evaluator")
    images = {split: ShardDataset(data, split).images for split in ("train", "test")}
    save_reference(compute_reference(evaluator, **images), root / "evaluator")
    model = DiffusionConfig(objective="edm", backbone={**TINY, "num_classes": 10, "in_channels": 1})
    export(
        root / "diffusion_pixel",
        denoiser_state=build_denoiser(model).state_dict(),
        model=model,
        sampling=SamplingConfig(),
        image_shape=(1, 16, 16),
        num_classes=10,
    )
    loop = {"steps": 4, "batch_size": 16, "lr": 0.002, "ema_decay": 0.9, "log_every": 2}
    variant = {"model": {"objective": "edm", "backbone": TINY}, "loop": loop}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"train_diffusion": {"pixel": variant, "latent": variant}}))
    return {"root": root, "data": data, "params": params}


def test_quick_run_writes_curves_reference_and_plot(fixture) -> None:
    root = fixture["root"]
    out = root / "reports"
    report = main(
        [
            "--quick",
            "--model", str(root / "diffusion_pixel"),
            "--evaluator", str(root / "evaluator"),
            "--data", str(fixture["data"]),
            "--params", str(fixture["params"]),
            "--out", str(out),
            "--threads", "1",
        ]
    )  # fmt: skip
    with (out / "plots" / "diffusion_fd_nfe.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    lines = {(r["model"], r["sampler"]) for r in rows}
    assert lines == {
        ("diffusion_pixel (edm)", "euler"),
        ("diffusion_pixel (edm)", "heun"),
        ("diffusion_pixel (edm)", "heun+churn"),
        *(("ddpm (trained here)", s) for s in ("ddpm", "ddim", "euler", "heun")),
    }
    for r in rows:
        steps, nfe, fd = int(r["steps"]), int(r["nfe"]), float(r["fd"])
        assert nfe == (2 * steps - 1 if r["sampler"].startswith("heun") else steps), r
        assert math.isfinite(fd) and fd >= 0, r
        assert float(r["fd_over_floor"]) == pytest.approx(fd / report["floor"], rel=1e-6)
        assert 0 <= float(r["cond_accuracy"]) <= 1
        want = "trailing" if r["sampler"] in ("ddpm", "ddim") else "karras"
        assert r["discretization"] == want, r
    # The 8-step ancestral reference is a point of the ddpm curve, which therefore reaches its own FD.
    ref = [r for r in rows if r["sampler"] == "ddpm" and r["steps"] == "8"]
    assert len(ref) == 1 and float(ref[0]["fd"]) == report["reference"]["fd"]
    assert report["nfe_to_reference"]["ddpm (trained here): ddpm"]["reached"]
    assert report["ddpm_model"]["train_steps"] == 4 and report["n"] == 48
    assert (out / "plots" / "diffusion_fd_nfe.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "bench_diffusion.json").is_file()


def test_nfe_to_reach_interpolates_in_log_nfe() -> None:
    curve = [(16, 2.0), (4, 10.0), (8, 5.0)]  # unsorted on purpose
    mid = nfe_to_reach(curve, 3.5)  # halfway from 5 to 2: halfway from log 8 to log 16
    assert mid["reached"] and not mid["at_first"] and mid["nfe"] == pytest.approx(math.sqrt(8 * 16))
    assert nfe_to_reach(curve, 5.0)["nfe"] == pytest.approx(8)
    assert nfe_to_reach(curve, 20.0) == {"nfe": 4, "reached": True, "at_first": True}
    assert nfe_to_reach(curve, 1.0) == {"nfe": None, "reached": False, "at_first": False}


def test_curves_follow_the_validity_table() -> None:
    steps = {"euler": (2,), "heun": (2,), "heun+churn": (2,), "ddim": (2,), "ddpm": (2,)}
    assert [(c.label, c.discretization) for c in curves("edm", steps, churn=True)] == [
        ("euler", "karras"),
        ("heun", "karras"),
        ("heun+churn", "karras"),
    ]
    ddpm = [(c.label, c.discretization) for c in curves("ddpm", steps, churn=False)]
    assert ddpm == [("ddpm", "trailing"), ("ddim", "trailing"), ("euler", "karras"), ("heun", "karras")]


@pytest.mark.parametrize("name", list(run.MODELS))
def test_every_throughput_row_builds_and_steps(fixture, name: str) -> None:
    """benchmarks/run.py's plain side on each row (evaluators and the diffusion UNet), two timed steps."""
    bench = dataclasses.replace(run.MODELS[name], steps=1)
    assert run.bench_loop(bench).log_every == bench.steps  # Ray's last log window = the timed steps
    assert run.plain_steps_per_s(bench, fixture["data"]) > 0


def test_trained_ddpm_model_is_reused_and_an_edm_model_refused(fixture, tmp_path) -> None:
    _, facts = train_ddpm(fixture["params"], fixture["data"], tmp_path, steps=2)
    generator, loaded = load_ddpm(tmp_path / "ddpm", device="cpu")
    assert generator.model.objective == "ddpm" and generator.model.backbone.channels == TINY["channels"]
    assert loaded == {"loaded_from": str(tmp_path / "ddpm"), **facts} and facts["train_steps"] == 2
    with pytest.raises(SystemExit, match="need 'ddpm'"):
        load_ddpm(fixture["root"] / "diffusion_pixel", device="cpu")
