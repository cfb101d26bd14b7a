"""The line a training stage prints before it starts: its estimated time from the data and params,
and a note when the data outgrows what the params were sized for."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest

from components import catalog
from components.config import load_stage
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.evaluation.evaluator import EvaluatorTask
from pipelines import estimate

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Digits as prepared by default, and 32x32 RGB glyphs: {name: (folder, meta)}."""
    root = tmp_path_factory.mktemp("estimate")
    out = {}
    for name, cfg in {
        "digits": PrepareConfig(),
        "glyphs": PrepareConfig(source="builtin:glyphs", image_size=32, channels=3, glyphs={"count": 120}),
    }.items():
        out[name] = (root / name, build_dataset(cfg, root / name, log=lambda _: None)["meta"])
    return out


def _evaluator(data_dir: Path, meta: dict, **loop_update) -> list[str]:
    sections = load_stage(PARAMS, "train_evaluator")
    cfg = sections["train_evaluator"]
    loop = cfg.loop.model_copy(update=loop_update)
    factory = partial(
        EvaluatorTask, cfg.model, loop, in_channels=meta["channels"], num_classes=meta["num_classes"]
    )
    spec = catalog.model("evaluator")
    return estimate.estimate_lines(spec, sections, loop=loop, task_factory=factory, data_dir=data_dir)


def _seconds(line: str) -> float:
    value, unit = re.search(r"estimate ~([\d.]+) (s|min) of training", line).groups()
    return float(value) * (60 if unit == "min" else 1)


def test_defaults_on_digits_estimate_the_reference_run(data):
    lines = _evaluator(*data["digits"])
    assert len(lines) == 1  # no note: the data is what the params were sized for
    ref = estimate.REFERENCES["evaluator"]
    assert lines[0].startswith("train_evaluator: estimate ~") and _seconds(lines[0]) == round(ref.train_s)
    assert "500 steps x 64 of 1x16x16, 0.30M parameters, 1 CPU worker(s)" in lines[0]


def test_the_estimate_scales_with_steps_and_data(data):
    base = _seconds(_evaluator(*data["digits"])[0])
    assert _seconds(_evaluator(*data["digits"], steps=2000)[0]) == pytest.approx(4 * base, rel=0.05)
    rgb = _evaluator(*data["glyphs"])
    assert _seconds(rgb[0]) == pytest.approx(12 * base, rel=0.05)  # 3x32x32 = 12x the values


def test_richer_data_than_the_params_were_sized_for_is_noted(data):
    _, note = _evaluator(*data["glyphs"])
    assert note.startswith(
        "train_evaluator: note: the data (3x32x32, 24 classes) is 12x the values per image"
    )
    assert "1.0x their parameters" in note and "give train_evaluator more capacity and steps" in note


def test_references_match_the_shipped_defaults():
    """Each reference's parameter count is what the shipped params build on digits (else re-measure)."""
    zoo = load_stage(PARAMS, "train_zoo")["train_zoo"]
    for variant in ("vae", "gan", "wgan", "flow", "pixelcnn"):
        spec = catalog.trained_by("train_zoo", variant)
        cfg = getattr(zoo, variant)
        factory = partial(
            catalog.recipe(spec).task, cfg.model, cfg.loop, image_shape=(1, 16, 16), num_classes=10
        )
        ref = estimate.REFERENCES[spec.name]
        assert estimate.parameter_count(factory) == ref.params, variant
        assert (cfg.loop.steps, cfg.loop.batch_size) == (ref.steps, ref.batch), variant


def test_input_size_per_stage():
    tokens = {"grid": [8, 8], "latent_channels": 8, "channels": 3, "image_size": 32}
    assert estimate.input_numel(catalog.model("prior_gpt"), tokens) == 64
    assert estimate.input_numel(catalog.model("diffusion_latent"), tokens) == 512
    assert estimate.input_numel(catalog.model("vae"), tokens) == 3 * 32 * 32


def test_counting_parameters_leaves_the_random_state(data):
    import torch

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    _evaluator(*data["digits"])
    assert torch.equal(torch.rand(4), expected)
