"""`make calibrate`'s shortened runs: a quarter of the steps, with validations and checkpoints as often
per step as in the full run, through the params overlay `genpipe preset` applies."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.calibrate import MIN_STEPS, shortened
from components import catalog
from components.config import flatten, load_stage
from components.training.config import LoopConfig

REPO = Path(__file__).resolve().parents[1]


def test_a_shortened_run_keeps_its_rhythm_per_step():
    loop = LoopConfig(
        steps=2500, batch_size=128, lr=1e-3, val_every=500, checkpoint_every=500, warmup_steps=40
    )
    overlay = shortened(catalog.model("diffusion_latent"), loop, fraction=0.25)
    assert overlay == {
        "train_diffusion": {
            "latent": {"loop": {"steps": 625, "val_every": 125, "checkpoint_every": 125, "warmup_steps": 10}}
        }
    }
    short = LoopConfig(steps=180, batch_size=64, lr=1e-3, checkpoint_every=90)  # val_every 0: left alone
    assert shortened(catalog.model("evaluator"), short, fraction=0.25) == {
        "train_evaluator": {"loop": {"steps": MIN_STEPS, "checkpoint_every": 50}}
    }
    tiny = LoopConfig(steps=40, batch_size=8, lr=1e-3)  # never more steps than the full run
    assert shortened(catalog.model("gan"), tiny, fraction=0.25) == {
        "train_zoo": {"gan": {"loop": {"steps": 40}}}
    }


def test_every_overlay_key_is_a_shipped_param():
    """`genpipe preset` refuses keys params.yaml lacks: each stage's overlay names existing ones."""
    shipped = flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    for spec in catalog.MODELS:
        sections = load_stage(REPO / "params.yaml", spec.stage)
        cfg = sections[spec.stage]
        loop = getattr(cfg, spec.variant).loop if spec.variant else cfg.loop
        keys = flatten(shortened(spec, loop, fraction=0.25))
        assert set(keys) <= set(shipped), spec.name
