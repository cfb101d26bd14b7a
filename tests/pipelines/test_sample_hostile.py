"""Hostile input to `genpipe sample` and to the pyfunc contract (`serving.predict`), on real tiny
generators: each is one line naming the culprit and its valid range, refused before any work."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from components.generators import load_generator
from components.registry.serving import decode_images, predict
from components.sampling_limits import MAX_SEED
from components.zoo import gan, vae
from pipelines.cli import app
from tests.components.registry.tiny_generators import register_tiny

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A registry with the tiny diffusion and MaskGIT models, a params.yaml pointing at it, and
    exported tiny VAE and GAN generators (random weights: only the checks are under test)."""
    root = tmp_path_factory.mktemp("hostile")
    store = register_tiny(root)
    (root / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"tracking_uri": store["uri"]}}))
    torch.manual_seed(0)
    tiny_vae = vae.VAEConfig(channels=8, channel_mult=(1, 2), latent_dim=4)
    net = vae.VAE(tiny_vae, image_shape=SHAPE, num_classes=3)
    vae.export(root / "models/vae", state=net.state_dict(), config=tiny_vae, image_shape=SHAPE, num_classes=3)
    tiny_gan = gan.GANConfig(latent_dim=8, g_channels=4, d_channels=4)
    g = gan.Generator(tiny_gan, image_shape=SHAPE, num_classes=3)
    gan.export(root / "models/gan", state=g.state_dict(), config=tiny_gan, image_shape=SHAPE, num_classes=3)
    return root


INF_LINE = "must be a finite number in [0, 50]"
SAMPLE_CASES = {
    "guidance inf": (["genpipe-diffusion@champion", "--guidance", "inf"], f"guidance=inf: {INF_LINE}"),
    "guidance 1e30": (["genpipe-diffusion@champion", "--guidance", "1e30"], f"guidance=1e+30: {INF_LINE}"),
    "guidance nan": (["genpipe-diffusion@champion", "--guidance", "nan"], f"guidance=nan: {INF_LINE}"),
    "temperature inf": (
        ["genpipe-prior-maskgit@champion", "--temperature", "inf"],
        "temperature=inf: must be a finite number in (0, 10]",
    ),
    "steps 10^6": (
        ["genpipe-diffusion@champion", "--steps", "1000000"],
        "steps=1000000: must be an integer in [1, 1000] (GENPIPE_MAX_STEPS raises the cap)",
    ),
    "steps as text": (
        ["genpipe-diffusion@champion", "--option", "steps=1e9"],
        "steps='1e9': must be an integer in [1, 1000] (GENPIPE_MAX_STEPS raises the cap)",
    ),
    "interval inf": (
        ["genpipe-diffusion@champion", "--option", "guidance_interval=[0, .inf]"],
        "guidance_interval=[0, inf]: must be null or [lo, hi] of finite numbers in [0, 10000]",
    ),
    "too many images": (
        ["genpipe-diffusion@champion", "-n", "100000"],
        "-n=100000 exceeds the cap of 1024 images per call (set GENPIPE_MAX_IMAGES to raise it)",
    ),
    "batch over the row cap": (
        ["genpipe-diffusion@champion", "--batch-size", "100000"],
        "--batch-size=100000 exceeds the cap of 512 rows per request (set GENPIPE_MAX_ROWS to raise it)",
    ),
    "seed 2**64": (
        ["genpipe-diffusion@champion", "--seed", str(2**64)],
        f"--seed={2**64} must be an integer in [0, 2**63 - 1 = {MAX_SEED}]",
    ),
    "negative seed": (
        ["genpipe-diffusion@champion", "--seed", "-1"],
        f"--seed=-1 must be an integer in [0, 2**63 - 1 = {MAX_SEED}]",
    ),
    "bad cap setting": (
        ["genpipe-diffusion@champion", "-n", "2"],
        "GENPIPE_MAX_IMAGES='lots' must be a positive integer (default 1024)",
    ),
}


def _sample(workspace: Path, home: Path, args: list[str], monkeypatch, **env: str):
    """`genpipe sample` in-process from `home` (its own root: a loaded model would be cached there)."""
    monkeypatch.chdir(home)
    monkeypatch.setenv("GENPIPE_ROOT", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # sample sets it from params.yaml; restored after
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    params = ["--params", str(workspace / "params.yaml")]
    return CliRunner().invoke(app, ["sample", *args, *params])


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_refuses_hostile_values_before_loading_the_model(workspace, tmp_path, monkeypatch, case):
    args, message = SAMPLE_CASES[case]
    env = {"GENPIPE_MAX_IMAGES": "lots"} if case == "bad cap setting" else {}
    result = _sample(workspace, tmp_path, [*args, "--out", "bad.png"], monkeypatch, **env)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines == [f"genpipe: error: sample: {message}"], lines
    assert not (tmp_path / "bad.png").exists()
    assert not (tmp_path / ".genpipe").exists()  # refused before the model was even downloaded


def test_out_paths_that_cannot_be_written_fail_before_sampling(workspace, tmp_path, monkeypatch):
    """A folder, a path under a regular file, a read-only tree, a non-PNG name: the user's path is named."""
    (tmp_path / "grids").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    cases = {
        "grids": "--out grids is a folder; give a file path such as grids/samples.png",
        "file.txt/grid.png": "--out file.txt/grid.png: file.txt is not a folder",
        "file.txt/deeper/grid.png": "--out file.txt/deeper/grid.png: file.txt is not a folder",
        "/proc/genpipe-grid.png": "--out /proc/genpipe-grid.png: cannot write into /proc (",
        "grid.jpg": "--out grid.jpg: the grid is written as PNG; give a path ending in .png",
    }
    for out, message in cases.items():
        result = _sample(
            workspace, tmp_path, ["genpipe-diffusion@champion", "-n", "2", "--out", out], monkeypatch
        )
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (out, result.output)
        assert lines[0].startswith(f"genpipe: error: sample: {message}"), lines
        assert ".tmp" not in lines[0]  # never the temporary file's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "grids"]
    assert not list((tmp_path / "grids").iterdir())


def test_caps_are_configurable_and_a_missing_folder_is_made(workspace, tmp_path, monkeypatch):
    """GENPIPE_MAX_IMAGES=3 allows 3 images, refuses 4; `--out` into a new folder works."""
    args = ["genpipe-diffusion@champion", "--steps", "1", "--sampler", "euler", "--label", "0"]
    result = _sample(workspace, tmp_path, [*args, "-n", "4"], monkeypatch, GENPIPE_MAX_IMAGES="3")
    assert result.exit_code == 1 and "-n=4 exceeds the cap of 3 images" in result.stderr
    result = _sample(
        workspace, tmp_path, [*args, "-n", "3", "--out", "new/grid.png"], monkeypatch, GENPIPE_MAX_IMAGES="3"
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new/grid.png").is_file()


# -- the pyfunc contract: serving.predict on the real generators --------------------------------


def _rows(n: int, **columns) -> pd.DataFrame:
    return pd.DataFrame({"label": [0] * n, "seed": list(range(n)), **columns})


def _refused(generator, table: pd.DataFrame) -> str:
    with pytest.raises(ValueError) as info:
        predict(generator, table)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_million_rows_fail_at_once(workspace, monkeypatch):
    generator = load_generator(workspace / "models/diffusion_pixel")
    table = pd.DataFrame({"seed": np.zeros(10**6, dtype=np.int64)})
    start = time.monotonic()
    message = _refused(generator, table)
    assert message == "1000000 rows exceed the cap of 512 rows per request (set GENPIPE_MAX_ROWS to raise it)"
    assert time.monotonic() - start < 10  # liveness only: sampling 10^6 images would take hours
    monkeypatch.setenv("GENPIPE_MAX_ROWS", "2")
    assert _refused(generator, _rows(3)).startswith("3 rows exceed the cap of 2 rows")
    assert len(predict(generator, _rows(2, steps=1, sampler="euler"))) == 2


def test_seeds_and_duplicate_columns_are_named(workspace):
    generator = load_generator(workspace / "models/diffusion_pixel")
    big = pd.DataFrame({"seed": pd.Series([0, 2**64], dtype=object)})
    assert (
        _refused(generator, big) == f"row 1: seed={2**64} must be an integer in [0, 2**63 - 1 = {MAX_SEED}]"
    )
    assert _refused(generator, _rows(2).assign(seed=[3, -1])).startswith(
        "row 1: seed=-1 must be an integer in"
    )
    twice = pd.DataFrame([[0, 1, 2]], columns=["seed", "label", "seed"])
    assert _refused(generator, twice) == "column 'seed' appears 2 times; give each column once"
    ok = predict(generator, pd.DataFrame({"seed": [MAX_SEED], "steps": [1], "sampler": ["euler"]}))
    assert ok["seed"].tolist() == [MAX_SEED]


@pytest.mark.parametrize(
    ("model", "column", "values", "message"),
    [
        (
            "diffusion_pixel",
            "guidance",
            [1.0, np.inf],
            "row 1: diffusion: guidance=inf: must be a finite number in [0, 50]",
        ),
        (
            "diffusion_pixel",
            "guidance",
            [1e30, 1.0],
            "row 0: diffusion: guidance=1e+30: must be a finite number",
        ),
        (
            "diffusion_pixel",
            "steps",
            [2, 10**6],
            "row 1: diffusion: steps=1000000: must be an integer in [1, 1000]",
        ),
        (
            "prior_maskgit",
            "temperature",
            [np.inf, 1.0],
            "row 0: temperature=inf: must be a finite number in (0, 10]",
        ),
        (
            "vae",
            "temperature",
            [0.5, np.inf],
            "row 1: vae: temperature=inf: must be a finite number in (0, 10]",
        ),
        (
            "vae",
            "temperature",
            [0.5, -1e30],
            "row 1: vae: temperature=-1e+30: must be a finite number in (0, 10]",
        ),
        (
            "gan",
            "truncation",
            [-1.0, 0.5],
            "row 0: gan: truncation=-1.0: must be null or a finite number in (0, 10]",
        ),
    ],
)
def test_option_cells_are_checked_for_every_row_before_sampling(workspace, model, column, values, message):
    generator = load_generator(workspace / "models" / model)
    got = _refused(generator, _rows(2, **{column: values}))
    assert got.startswith(message), got


def test_an_empty_cell_still_means_the_trained_default(workspace):
    """NaN is how a table marks a gap: it keeps the default (the CLI refuses `--guidance nan`)."""
    generator = load_generator(workspace / "models/vae")
    table = _rows(2, temperature=[np.nan, 1.0]).assign(seed=[7, 7], label=[1, 1])
    images = decode_images(predict(generator, table)["image"])
    default = decode_images(predict(generator, _rows(1).assign(seed=[7], label=[1]))["image"])
    assert images.shape == (2, 8, 8, 1) and (images[:1] == default).all()


def test_check_options_validates_without_sampling_on_every_family(workspace):
    """What `evaluate --dry-run` and `predict` call: the merged options, or the family's one line."""
    cases = {
        "diffusion_pixel": (
            {"steps": 2},
            {"sampler": "ddpm"},
            "objective=edm cannot sample with sampler=ddpm",
        ),
        "prior_maskgit": (
            {"steps": 2},
            {"use_cache": True},
            "prior/maskgit: unknown sampling option 'use_cache'",
        ),
        "vae": (
            {"temperature": 0.5},
            {"temperature": 0},
            "vae: temperature=0: must be a finite number in (0, 10]",
        ),
        "gan": ({"truncation": 1}, {"truncation": -1}, "gan: truncation=-1: must be null or a finite number"),
    }
    for model, (good, bad, message) in cases.items():
        generator = load_generator(workspace / "models" / model)
        merged = generator.check_options(good)
        assert set(merged) == set(generator.default_options) and all(merged[k] == v for k, v in good.items())
        with pytest.raises(ValueError) as info:
            generator.check_options(bad)
        assert message in str(info.value), (model, str(info.value))


def test_an_integer_too_large_for_a_float_is_one_line(workspace):
    generator = load_generator(workspace / "models/diffusion_pixel")
    table = pd.DataFrame({"seed": [0], "guidance": pd.Series([10**400], dtype=object)})
    assert _refused(generator, table).startswith(f"row 0: diffusion: guidance={10**400!r}"[:40])


def test_the_mlmodel_metadata_states_the_limits(workspace):
    """A client reads each option's range from `metadata["genpipe"]`, the table's own words."""
    from components.registry.serving import describe

    about = describe(load_generator(workspace / "models/diffusion_pixel"))
    assert about["limits"]["guidance"] == "must be a finite number in [0, 50]"
    assert about["limits"]["steps"].startswith("must be an integer in [1, 1000]")
    assert "sampler" not in about["limits"] and about["seed"] == f"an integer in [0, {MAX_SEED}]"
