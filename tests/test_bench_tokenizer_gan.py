"""The VQGAN discriminator ablation on a tiny fixture: both arms reach the prior's FID in one code path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.tokenizer_gan import main
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.data.readers import ShardDataset
from components.evaluation.evaluator import Evaluator, EvaluatorConfig, save_evaluator
from components.evaluation.reference import compute_reference, save_reference
from components.generators import load_generator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """data/processed (digits), an untrained tiny models/evaluator with its statistics, tiny params."""
    root = tmp_path_factory.mktemp("tokenizer_gan")
    data = root / "data" / "processed"
    build_dataset(PrepareConfig(), data, log=lambda *_: None)
    torch.manual_seed(0)
    evaluator = Evaluator(EvaluatorConfig(widths=(8,), feature_dim=8), in_channels=1, num_classes=10).eval()
    save_evaluator(evaluator, root / "models" / "evaluator")
    images = {split: ShardDataset(data, split).images for split in ("train", "test")}
    save_reference(compute_reference(evaluator, **images), root / "models" / "evaluator")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tok = params["train_tokenizer"]
    tok["model"]["autoencoder"] |= {"channels": 8, "z_channels": 8, "attention": False}
    tok["model"]["loss"]["disc"] |= {"start_step": 1, "channels": 8}  # the "on" arm trains its discriminator
    tok["loop"] |= {"steps": 3, "warmup_steps": 1, "val_every": 0, "log_every": 1}
    gpt = params["train_prior"]["gpt"]
    gpt["model"]["gpt"] |= {"layers": 1, "width": 32}
    gpt["loop"] |= {"steps": 3, "warmup_steps": 1, "log_every": 1}
    params["evaluate"] |= {"num_samples": 20, "batch_size": 8}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_both_arms_write_reconstruction_and_prior_figures(workdir, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    out = workdir / "bench" / "results.jsonl"
    rows = main(["--data", "digits", "--disc", "off", "on", "--out", str(out), "--params", "params.yaml"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    off, on = rows
    assert (off["disc"], on["disc"]) == ("off", "on")
    assert off["disc_config"]["weight"] == 0 and on["disc_config"]["weight"] > 0
    assert "test_d_acc_real" in on and "test_d_acc_real" not in off
    for row in rows:
        assert row["steps"] == 3 and row["prior_steps"] == 3 and row["prior_num_samples"] == 20
        assert row["prior_fid"] >= 0 and row["prior_fid_over_floor"] == pytest.approx(
            row["prior_fid"] / row["prior_fid_floor"]
        )
        assert row["prior_fid_floor"] == pytest.approx(row["rfid_floor"])
        assert 0 <= row["prior_cond_accuracy"] <= 1
        folder = out.parent / "runs" / f"digits-{row['disc']}"
        assert not (folder / "checkpoints").exists()
        generator = load_generator(folder / "prior_gpt")  # the exported two-stage model, as evaluate loads it
        assert generator.image_shape == (1, 16, 16) and generator.num_classes == 10
