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
from pipelines import estimate, plan, preset

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
    ref = estimate.REFERENCES["evaluator"].digits
    assert lines[0].startswith("train_evaluator: estimate ~") and _seconds(lines[0]) == round(ref.train_s)
    assert "500 steps x 64 of 1x16x16, 0.30M parameters, 57 MFLOP per sample, 1 CPU worker(s)" in lines[0]


def test_the_estimate_scales_with_steps_and_flops(data):
    base = _seconds(_evaluator(*data["digits"])[0])
    assert _seconds(_evaluator(*data["digits"], steps=2000)[0]) == pytest.approx(4 * base, rel=0.05)
    rgb = _evaluator(*data["glyphs"])[0]  # 3x32x32: the preset's network, so its measured step time
    ref = estimate.REFERENCES["evaluator"]
    assert "232 MFLOP per sample" in rgb and f"{ref.rgb32.step_s * 1e3:.0f} ms with the rgb32 preset" in rgb
    assert _seconds(rgb) == pytest.approx(500 * ref.rgb32.step_s, abs=0.5)
    assert _seconds(_evaluator(*data["glyphs"], batch_size=128)[0]) > 1.5 * _seconds(rgb)  # FLOPs per step


def test_each_reference_is_a_rising_line_through_its_runs():
    """A step costs an overhead >= 0 plus its FLOPs at a positive rate: the line meets the rgb32 run,
    and the digits run too where its intercept is not negative (else within 15%)."""
    for name, ref in estimate.REFERENCES.items():
        assert ref.overhead_s >= 0 and ref.seconds_per_flop > 0, name
        assert ref.step_seconds(ref.rgb32.step_flops) == pytest.approx(ref.rgb32.step_s, rel=1e-9), name
        exact = 1e-9 if ref.overhead_s > 0 else 0.15
        assert ref.step_seconds(ref.digits.step_flops) == pytest.approx(ref.digits.step_s, rel=exact), name
    flow = estimate.REFERENCES["flow"]  # Glow's many small layers: most of a digits step is overhead
    assert flow.overhead_s > 0.8 * flow.digits.step_s


def test_richer_data_than_the_params_were_sized_for_is_noted(data):
    _, note = _evaluator(*data["glyphs"])
    assert note.startswith(
        "train_evaluator: note: the data (3x32x32, 24 classes) is 12x the values per image"
    )
    assert "1.0x their parameters" in note and "give train_evaluator more capacity and steps" in note


def test_references_match_the_shipped_defaults():
    """Each reference's parameters and FLOPs are what the shipped params build on digits, built as
    `genpipe repro --dry-run` builds each stage's task (pipelines/plan.py); else re-measure."""
    images = plan.planned_meta(PARAMS)
    assert {k: images[k] for k in ("channels", "image_size", "num_classes")} == estimate.SIZED_FOR
    tokens = plan.token_meta(PARAMS, images)
    assert (tokens["grid"], tokens["latent_channels"], tokens["codebook_size"]) == ([4, 4], 8, 128)
    for spec, loop, ref in _built_against(PARAMS, images, tokens, run="digits"):
        assert (loop.steps, loop.batch_size) == (ref.steps, ref.batch), spec.name


def _built_against(params: Path, images: dict, tokens: dict, *, run: str):
    """(spec, loop, the reference's `run`) per model, once its parameters and FLOPs are checked."""
    for spec in catalog.MODELS:
        meta = tokens if spec.data == catalog.TOKENS else images
        _, loop, factory = plan.stage_task(spec, params, meta)
        count, flops = estimate.step_cost(factory, estimate.synthetic_batch(spec, meta))
        ref = getattr(estimate.REFERENCES[spec.name], run)
        assert count == ref.params and flops == pytest.approx(ref.flops, rel=1e-3), spec.name
        yield spec, loop, ref


def test_references_match_the_rgb32_preset(tmp_path):
    """The second runs are the rgb32 preset's networks and batches on the glyphs; else re-measure
    (`make calibrate`)."""
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    preset.main(params=params, name="rgb32")
    text = params.read_text().replace("source: builtin:digits", "source: builtin:glyphs", 1)
    params.write_text(text)
    images = plan.planned_meta(params)
    assert (images["channels"], images["image_size"], images["num_classes"]) == (3, 32, 24)
    tokens = plan.token_meta(params, images)
    for spec, loop, ref in _built_against(params, images, tokens, run="rgb32"):
        assert loop.batch_size == ref.batch, spec.name


def test_synthetic_batches_are_shaped_as_the_readers_rows():
    tokens = {"grid": [8, 8], "latent_channels": 8, "channels": 3, "image_size": 32, "num_classes": 0}
    batch = estimate.synthetic_batch(catalog.model("prior_gpt"), tokens)
    assert batch["tokens"].shape == (2, 8, 8) and batch["latent"].shape == (2, 8, 8, 8)
    assert batch["label"].tolist() == [-1, -1]  # unlabelled
    image = estimate.synthetic_batch(catalog.model("vae"), {**tokens, "num_classes": 24})
    assert image["image"].shape == (2, 3, 32, 32) and image["label"].tolist() == [0, 1]


def test_counting_parameters_leaves_the_random_state(data):
    import torch

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    _evaluator(*data["digits"])
    assert torch.equal(torch.rand(4), expected)
