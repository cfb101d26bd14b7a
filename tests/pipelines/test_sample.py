"""`genpipe sample MODEL@ALIAS`: a grid from a registered tiny generator; bad input is one line, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from tests.components.registry.tiny_generators import register_tiny
from tests.conftest import run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A repo-like folder with a registry holding tiny generators and a params.yaml pointing at it."""
    root = tmp_path_factory.mktemp("sample")
    store = register_tiny(root)
    (root / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"tracking_uri": store["uri"]}}))
    return root


def test_sample_writes_a_grid_of_the_right_size(workspace: Path):
    """A fresh `genpipe` process from the registry: 10 images, 4 columns of 16 px tiles shown at 64 px."""
    proc = run(
        ["genpipe", "sample", "genpipe-diffusion@champion", "-n", "10", "--label", "1", "--out", "grid.png",
         "--sampler", "euler", "--steps", "2", "--guidance", "2", "--seed", "3", "--batch-size", "4"],
        workspace,
        GENPIPE_ROOT=str(workspace),
    )  # fmt: skip
    grid = Image.open(workspace / "grid.png")
    assert grid.size == (2 + 4 * (64 + 2), 2 + 3 * (64 + 2)) and grid.mode == "L"
    assert "10/10" in proc.stderr  # the progress bar
    assert "10 images from genpipe-diffusion v1 (champion)" in proc.stdout
    assert not [p.name for p in workspace.iterdir() if p.name.startswith(".grid")]  # no temp file left
    cached = list((workspace / ".genpipe/models").iterdir())
    assert len(cached) == 1 and (cached[0] / "MLmodel").is_file()


BAD = {
    "bad alias": (
        ["genpipe-diffusion@best"],
        "genpipe-diffusion has no alias 'best'; its aliases: champion (v1)",
    ),
    "bad version": (
        ["diffusion_pixel@v9"],
        "genpipe-diffusion has no version '9'; its aliases: champion (v1)",
    ),
    "bad model": (["genpipe-difusion@champion"], "unknown model 'genpipe-difusion'; valid: diffusion_pixel,"),
    "unregistered": (
        ["genpipe-gan@champion"],
        "no registered model 'genpipe-gan'; registered: genpipe-diffusion, genpipe-prior-maskgit",
    ),
    "bad option": (
        ["genpipe-prior-maskgit@champion", "--sampler", "heun"],
        "genpipe-prior-maskgit has no sampling option 'sampler'; valid: choice_temperature, guidance, steps,",
    ),
    "bad option value": (
        ["genpipe-diffusion@champion", "--option", "discretization=cosine"],
        "discretization='cosine'",
    ),
    "bad label": (["genpipe-diffusion@champion", "--label", "3"], "--label 3 is not valid; choose 0..2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_valid_choices(workspace: Path, case: str, monkeypatch):
    args, message = BAD[case]
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("GENPIPE_ROOT", str(workspace))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # sample sets it from params.yaml; restored after
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    result = CliRunner().invoke(app, ["sample", *args, "-n", "2", "--out", "bad.png"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("genpipe: error: sample: "), lines
    assert message in lines[0]
    assert not (workspace / "bad.png").exists()
