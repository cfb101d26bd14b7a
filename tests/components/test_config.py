"""Every shipped params section validates; bad values fail naming key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import STAGE_SECTIONS, ParamsError, load_stage, validate_all, validate_section

REPO = Path(__file__).resolve().parents[2]


def test_shipped_params_validate():
    sections = validate_all(REPO / "params.yaml")
    assert {"train", "ray", "mlflow", "prepare"} <= set(sections)
    for stage in STAGE_SECTIONS:
        assert stage in sections, f"params.yaml has no section for stage {stage}"


def test_every_dvc_stage_param_has_a_section():
    from components.config import SHARED_SECTIONS

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)  # foreach stages keep their template under `do`
        for param in body.get("params", []):
            section = param.split(".")[0]
            assert section in STAGE_SECTIONS or section in SHARED_SECTIONS, (name, param)
            if "${key}" in param:  # every foreach item has its own params block
                for key in stage["foreach"]:
                    assert key in raw[section], (name, key)


@pytest.mark.parametrize(
    ("section", "raw", "needle"),
    [
        ("prepare", {"image_size": 2}, "prepare.image_size=2"),
        ("prepare", {"image_size": "big"}, "prepare.image_size='big'"),
        ("prepare", {"channels": 2}, "prepare.channels=2"),
        ("prepare", {"source": "ftp:foo"}, "builtin:digits"),
        ("prepare", {"aspect": "squash"}, "center_crop"),
        ("prepare", {"split": {"val": 0.5, "test": 0.45}}, "leaves under 10%"),
        ("prepare", {"split": {"test": 0.0}}, "prepare.split.test=0.0"),
        ("prepare", {"background": [0, 0, 300]}, "0..255"),
        ("prepare", {"shapes": {"classes": ["circle", "blob"]}}, "blob"),
        ("prepare", {"on_bad_image": "ignore"}, "'error' or 'skip'"),
        ("prepare", {"imgsize": 16}, "prepare.imgsize: unknown key"),
        ("prepare", {"split": {"tset": 0.1}}, "prepare.split.tset: unknown key (allowed here: test, val)"),
        ("train", {"num_workers": 0}, "train.num_workers=0"),
        ("train", {"precision": "fp16"}, "bf16"),
        ("ray", {"num_cpus": 0}, "ray.num_cpus=0"),
        ("mlflow", {"experiment": ""}, "mlflow.experiment=''"),
    ],
)
def test_bad_value_names_key(section, raw, needle):
    with pytest.raises(ParamsError) as info:
        validate_section(section, raw)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_unknown_section_and_stage(tmp_path):
    with pytest.raises(ParamsError, match="unknown params section 'prepar'"):
        validate_section("prepar", {})
    p = tmp_path / "params.yaml"
    p.write_text("prepare: {}\n")
    with pytest.raises(ParamsError, match="unknown stage 'nope'"):
        load_stage(p, "nope")


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_stage(tmp_path / "absent.yaml", "prepare")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_stage(bad, "prepare")


def test_missing_section_takes_defaults(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("prepare: {image_size: 8}\n")
    sections = load_stage(p, "prepare")
    assert sections["prepare"].image_size == 8
    assert sections["train"].num_workers == 1


@pytest.mark.parametrize(
    ("variant", "key", "value", "needle"),
    [
        (
            "wgan",
            "model",
            {"loss": "ns"},
            "train_zoo.wgan.model.loss='ns': the wgan variant trains loss 'wgan_gp'",
        ),
        (
            "gan",
            "model",
            {"loss": "wgan_gp"},
            "train_zoo.gan.model.loss='wgan_gp': the gan variant trains loss 'ns'",
        ),
        ("gan", "loop", {"betas": [0.5, 0.9]}, "train_zoo.gan.loop.betas=[0.5, 0.9]: not read by a GAN"),
    ],
)
def test_train_zoo_variants_keep_their_own_loss(variant, key, value, needle):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["train_zoo"]
    raw[variant][key].update(value)
    with pytest.raises(ParamsError) as info:
        validate_section("train_zoo", raw)
    assert needle in str(info.value) and "\n" not in str(info.value)


def _shipped(section: str) -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())[section]


INF, NAN = float("inf"), float("nan")

#: (section, path to a key inside the shipped section, value, the one line's start, its range)
SAMPLING_VALUES = [
    (
        "train_diffusion",
        "pixel.sampling.guidance",
        INF,
        "train_diffusion.pixel.sampling.guidance=inf",
        "[0, 50]",
    ),
    ("train_diffusion", "pixel.sampling.guidance", 1e30, "pixel.sampling.guidance=1e+30", "[0, 50]"),
    ("train_diffusion", "latent.sampling.guidance", NAN, "latent.sampling.guidance=nan", "[0, 50]"),
    ("train_diffusion", "pixel.sampling.steps", 1e9, "pixel.sampling.steps=1000000000.0", "[1, 1000]"),
    ("train_diffusion", "pixel.sampling.rho", INF, "pixel.sampling.rho=inf", "(0, 100]"),
    (
        "train_diffusion",
        "pixel.sampling.guidance_interval",
        [0, INF],
        "guidance_interval=[0, inf]",
        "[0, 10000]",
    ),
    ("train_prior", "maskgit.sampling.steps", 10**6, "maskgit.sampling.steps=1000000", "[1, 1000]"),
    ("train_prior", "gpt.sampling.temperature", INF, "gpt.sampling.temperature=inf", "(0, 10]"),
    ("train_prior", "gpt.sampling.top_p", NAN, "gpt.sampling.top_p=nan", "(0, 1]"),
    ("train_zoo", "vae.sampling.temperature", INF, "train_zoo.vae.sampling.temperature=inf", "(0, 10]"),
    ("train_zoo", "gan.sampling.truncation", -1, "train_zoo.gan.sampling.truncation=-1", "(0, 10]"),
    ("train_zoo", "flow.sampling.temperature", 1e30, "flow.sampling.temperature=1e+30", "(0, 10]"),
]


@pytest.mark.parametrize(("section", "path", "value", "start", "interval"), SAMPLING_VALUES)
def test_sampling_values_must_be_finite_and_in_range(section, path, value, start, interval):
    """`.inf`, `.nan`, 1e30 and 1e9 steps validate no more: one line naming the key and the range."""
    raw = _shipped(section)
    *parents, key = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    with pytest.raises(ParamsError) as info:
        validate_section(section, raw)
    message = str(info.value)
    assert start in message and interval in message and "\n" not in message, message


def test_steps_cap_follows_the_environment(monkeypatch):
    raw = _shipped("train_diffusion")
    raw["pixel"].setdefault("sampling", {})["steps"] = 1500
    with pytest.raises(
        ParamsError, match=r"steps=1500: must be an integer in \[1, 1000\] \(GENPIPE_MAX_STEPS"
    ):
        validate_section("train_diffusion", raw)
    monkeypatch.setenv("GENPIPE_MAX_STEPS", "2000")
    assert validate_section("train_diffusion", raw).pixel.sampling.steps == 1500


def test_a_renamed_zoo_key_is_named_in_a_short_line():
    raw = _shipped("train_zoo")
    raw["gann"] = raw.pop("gan")
    with pytest.raises(ParamsError) as info:
        validate_section("train_zoo", raw)
    message = str(info.value)
    assert message == (
        "train_zoo.gann: unknown key (allowed here: flow, gan, pixelcnn, vae, wgan); did you mean 'gan'?"
    )


def test_a_missing_key_does_not_print_the_section():
    raw = _shipped("train_zoo")
    del raw["gan"]
    with pytest.raises(ParamsError) as info:
        validate_section("train_zoo", raw)
    assert str(info.value) == "train_zoo.gan: missing (required here)"


@pytest.mark.parametrize(
    ("kind", "knob", "value", "own"),
    [
        ("gpt", "steps", 4, "guidance, temperature, top_k, top_p, use_cache"),
        ("gpt", "choice_temperature", 2.0, "guidance, temperature, top_k, top_p, use_cache"),
        ("maskgit", "use_cache", False, "choice_temperature, guidance, steps, temperature, top_k, top_p"),
    ],
)
def test_knobs_of_the_other_prior_are_refused(kind, knob, value, own):
    raw = _shipped("train_prior")
    raw[kind].setdefault("sampling", {})[knob] = value
    with pytest.raises(ParamsError) as info:
        validate_section("train_prior", raw)
    assert (
        str(info.value)
        == f"train_prior.{kind}.sampling.{knob}: not a {kind} knob; a {kind} prior samples with: {own}"
    )


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (
            {"diffusion_pixel": {"steps": 0}},
            "evaluate.options.diffusion_pixel.steps=0: must be an integer in [1, ",
        ),
        (
            {"prior_maskgit": {"steps": 0}},
            "evaluate.options.prior_maskgit.steps=0: must be an integer in [1, ",
        ),
        (
            {"diffusion_pixel": {"temperature": 0.5}},
            "evaluate.options.diffusion_pixel.temperature: unknown sampling option for diffusion_pixel; valid: S_churn,",
        ),
        (
            {"gan": {"truncation": -1}},
            "evaluate.options.gan.truncation=-1: must be null or a finite number in (0, 10]",
        ),
        (
            {"wgan": {"temperature": 1.0}},
            "evaluate.options.wgan.temperature: unknown sampling option for wgan; valid: truncation",
        ),
        (
            {"prior_gpt": {"steps": 3}},
            "evaluate.options.prior_gpt.steps: unknown sampling option for prior_gpt",
        ),
        (
            {"vae": {"temperature": INF}},
            "evaluate.options.vae.temperature=inf: must be a finite number in (0, 10]",
        ),
        (
            {"diffusion_latent": {"sampler": "dpm"}},
            "evaluate.options.diffusion_latent.sampler='dpm': Input should be",
        ),
    ],
)
def test_evaluate_options_are_checked_against_each_family(options, needle):
    with pytest.raises(ParamsError) as info:
        validate_section("evaluate", {"options": options})
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_good_evaluate_options_pass():
    options = {
        "diffusion_pixel": {"steps": 10, "sampler": "euler", "guidance": 2.0},
        "prior_maskgit": {"steps": 4, "choice_temperature": 3.0},
        "prior_gpt": {"use_cache": False, "top_k": 5},
        "gan": {"truncation": None},
        "flow": {"temperature": 0.7},
    }
    assert validate_section("evaluate", {"options": options}).options == options
