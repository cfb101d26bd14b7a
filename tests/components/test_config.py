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
