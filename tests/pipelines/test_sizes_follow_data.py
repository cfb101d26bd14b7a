"""Every size-like param follows the prepared data: the shipped params.yaml, with only `prepare`
changed, validates every training stage on 16x16 grey digits and on 32x32 RGB glyphs, and so does
it with the 32x32 RGB preset applied (`genpipe preset rgb32`); a set value the data contradicts is
one line naming the param.

The stages run their real `--dry-run` checks (no Ray, no MLflow) on real prepared data, with an
untrained evaluator in models/evaluator (the tokenizer stage loads it before any work).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from components.config import load_stage
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.diffusion.sizing import resolve_backbone
from components.evaluation.evaluator import Evaluator, EvaluatorConfig, save_evaluator
from components.prior.task import build_prior
from components.zoo.flow import FlowTask
from pipelines import preset, train_diffusion, train_evaluator, train_prior, train_tokenizer, train_zoo
from pipelines.lineage import ROOT_ENV

REPO = Path(__file__).resolve().parents[2]
GLYPHS = {"source": "builtin:glyphs", "image_size": 32, "channels": 3, "glyphs": {"count": 120}}
DATASETS = {
    "digits": {"source": "builtin:digits", "image_size": 16, "channels": 1},
    "glyphs": GLYPHS,
    "glyphs+rgb32": GLYPHS,  # the shipped params with the 32x32 RGB preset applied (presets/rgb32.yaml)
}
GRIDS = {
    "digits": 4,
    "glyphs": 8,
    "glyphs+rgb32": 8,
}  # token grid sides the tokenizer's downsampling follows to


@pytest.fixture(scope="module", params=sorted(DATASETS))
def workspace(request, tmp_path_factory):
    """(name, root): params.yaml as shipped but for `prepare`, prepared data, an untrained evaluator."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] = {**params["prepare"], **DATASETS[name]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if name.endswith("+rgb32"):
        assert preset.main(params=root / "params.yaml", name="rgb32")[-1].startswith("preset rgb32: ")
        params = yaml.safe_load((root / "params.yaml").read_text())
    meta = build_dataset(PrepareConfig(**params["prepare"]), root / "data/processed", log=lambda _: None)[
        "meta"
    ]
    net = Evaluator.from_config(
        EvaluatorConfig(widths=(8,), feature_dim=8),
        in_channels=meta["channels"],
        num_classes=meta["num_classes"],
    )
    save_evaluator(net, root / "models/evaluator")
    old = os.environ.get(ROOT_ENV)
    os.environ[ROOT_ENV] = str(root)
    yield name, root
    if old is None:
        os.environ.pop(ROOT_ENV)
    else:
        os.environ[ROOT_ENV] = old


def _dry_run(module, root: Path, **args) -> None:
    module.main(params=root / "params.yaml", dry_run=True, **args)


def test_shipped_params_set_no_size(workspace):
    _, root = workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert "in_channels" not in params["train_tokenizer"]["model"]["autoencoder"]
    assert "downsample_factor" not in params["train_tokenizer"]["model"]["autoencoder"]
    for variant in ("pixel", "latent"):
        assert not {"in_channels", "num_classes"} & set(
            params["train_diffusion"][variant]["model"]["backbone"]
        )


def test_every_training_stage_validates(workspace, capsys):
    name, root = workspace
    _dry_run(train_evaluator, root)
    _dry_run(train_tokenizer, root)
    size, channels = DATASETS[name]["image_size"], DATASETS[name]["channels"]
    g = GRIDS[name]
    assert f"{size}x{size}x{channels} images -> {g}x{g} tokens" in capsys.readouterr().out
    _dry_run(train_diffusion, root, variant="pixel")
    for variant in ("vae", "gan", "wgan", "flow", "pixelcnn"):
        _dry_run(train_zoo, root, variant=variant)


def test_token_stages_follow_the_fitted_tokenizer(workspace):
    """The grid the tokenizer leaves sizes the priors' position tables and latent diffusion's input."""
    name, root = workspace
    meta = yaml.safe_load((root / "data/processed/meta.json").read_text())
    tok = load_stage(root / "params.yaml", "train_tokenizer")["train_tokenizer"]
    model = train_tokenizer.fit_model(tok, meta)
    assert model.autoencoder.in_channels == DATASETS[name]["channels"]
    g = meta["image_size"] // model.autoencoder.downsample_factor
    assert g == GRIDS[name]
    priors = load_stage(root / "params.yaml", train_prior.STAGE)[train_prior.STAGE]
    for kind in ("gpt", "maskgit"):
        prior = build_prior(
            getattr(priors, kind).model, grid=(g, g), codebook_size=model.codebook_size, num_classes=24
        )
        assert prior.net.pos_emb.shape[1] in (g * g, g * g + 1)  # the grid's tokens (+ the class token)
    diffusion = load_stage(root / "params.yaml", "train_diffusion")["train_diffusion"]
    backbone = resolve_backbone(
        diffusion.latent, variant="latent", channels=model.code_dim, num_classes=24, size=g
    ).backbone
    assert (backbone.in_channels, backbone.num_classes) == (model.code_dim, 24)


@pytest.mark.parametrize(
    ("key", "value", "culprit"),
    [
        ("in_channels", 2, "train_tokenizer.model.autoencoder.in_channels=2 but the prepared images have"),
        ("downsample_factor", 16, "f=4, but downsample_factor=16; use 3 levels"),
    ],
)
def test_a_contradicting_value_names_the_param(workspace, tmp_path, key, value, culprit, capsys):
    from components.config import ParamsError

    _, root = workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    bad = copy.deepcopy(params)
    bad["train_tokenizer"]["model"]["autoencoder"][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises((ValueError, ParamsError)) as info:
        train_tokenizer.main(params=path, dry_run=True)
    assert culprit in str(info.value) and "\n" not in str(info.value)


def test_an_explicit_factor_is_kept_and_must_divide(workspace, tmp_path):
    _, root = workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    ae = params["train_tokenizer"]["model"]["autoencoder"]
    ae.update(channel_mult=[1, 2], downsample_factor=2)  # an 8x8 / 16x16 grid: set, so kept
    meta = yaml.safe_load((root / "data/processed/meta.json").read_text())
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    tok = load_stage(path, "train_tokenizer")["train_tokenizer"]
    assert train_tokenizer.fit_model(tok, meta).autoencoder.downsample_factor == 2
    with pytest.raises(ValueError, match=r"downsample_factor=2 does not divide prepare.image_size=17"):
        train_tokenizer.fit_model(tok, {**meta, "image_size": 17})


def test_flow_levels_follow_the_data(workspace, capsys):
    """Unset flow levels squeeze down to a 1x1 top latent: 4 on 16x16 (the shipped value before), 5 on
    32x32; the dry run shows, and the task builds, the fitted value."""
    name, root = workspace
    size, channels = DATASETS[name]["image_size"], DATASETS[name]["channels"]
    levels = size.bit_length() - 1
    zoo = load_stage(root / "params.yaml", train_zoo.STAGE)[train_zoo.STAGE]
    assert zoo.flow.model.levels is None
    capsys.readouterr()
    _dry_run(train_zoo, root, variant="flow")
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown[train_zoo.STAGE]["model"]["levels"] == levels
    task = FlowTask(zoo.flow.model, zoo.flow.loop, image_shape=(channels, size, size), num_classes=24)
    task.build(device="cpu", wrap=lambda m: m)
    glow = task.modules["flow"]
    assert len(glow.levels) == levels and glow.top_shape == (channels * 2 ** (levels + 1), 1, 1)


def test_a_flow_level_count_the_size_contradicts_names_it(workspace, tmp_path):
    name, root = workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    size = DATASETS[name]["image_size"]
    params["train_zoo"]["flow"]["model"]["levels"] = levels = size.bit_length()  # one squeeze too many
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError) as info:
        train_zoo.main(params=path, variant="flow", dry_run=True)
    assert str(info.value) == (
        f"flow: image size {size}x{size} must be a multiple of {2**levels} (levels={levels} squeezes)"
    )
