"""The `genpipe` command as a user runs it: help, dry runs, one-line errors with non-zero exits."""

from __future__ import annotations

from pathlib import Path

import yaml

from components.catalog import STAGES
from tests.conftest import run


def test_help_lists_every_stage(tmp_path: Path):
    out = run(["genpipe", "--help"], tmp_path).stdout
    for stage in STAGES:  # every DVC stage of the catalog, promote included
        assert stage.name in out


def test_dry_run_prints_resolved_config_and_writes_nothing(repo_copy: Path):
    proc = run(["genpipe", "prepare", "--dry-run"], repo_copy)
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["prepare"]["source"] == "builtin:digits"
    assert resolved["train"]["num_workers"] == 1
    assert not (repo_copy / "data").exists() and not (repo_copy / "mlflow.db").exists()


def test_bad_param_is_one_line_and_nonzero(repo_copy: Path):
    params = repo_copy / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["prepare"]["image_size"] = 1
    params.write_text(yaml.safe_dump(raw))
    proc = run(["genpipe", "prepare", "--dry-run"], repo_copy, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "prepare.image_size=1" in lines[0]


def test_missing_source_path_fails_before_work(repo_copy: Path):
    proc = run(["genpipe", "prepare", "--params", "p.yaml"], repo_copy, check=False)
    assert proc.returncode == 1 and "params file not found" in proc.stderr
    (repo_copy / "p.yaml").write_text("prepare: {source: 'imagefolder:nowhere'}\n")
    proc = run(["genpipe", "prepare", "--params", "p.yaml"], repo_copy, check=False)
    assert proc.returncode == 1
    assert "nowhere" in proc.stderr and "does not exist" in proc.stderr
    assert not (repo_copy / "data").exists()


USAGE_ERRORS = {
    "promote without a model": (["promote"], "promote: Missing argument 'MODEL...'."),
    "label not an integer": (
        ["sample", "genpipe-diffusion@champion", "--label", "abc"],
        "sample: Invalid value for '--label': Input should be a valid integer, unable to parse string as an integer",
    ),
    "count not an integer": (
        ["sample", "genpipe-diffusion@champion", "-n", "many"],
        "sample: Invalid value for '-n': Input should be a valid integer, unable to parse string as an integer",
    ),
    "unknown option": (
        ["sample", "genpipe-diffusion@champion", "--bogus"],
        "sample: No such option: --bogus (Possible options: --out)",
    ),
    "extra argument": (["rollback", "a", "b"], "rollback: Got unexpected extra argument(s) (b)"),
    "unknown command": (["sampel"], "No such command 'sampel'. Did you mean 'sample'?"),
    "stage without its variant": (["train_zoo"], "train_zoo: Missing argument 'VARIANT'."),
}


def test_usage_errors_are_one_line_and_exit_2():
    """Every click/typer usage error is the project's one line (no 5-line box), exit status 2."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    for case, (args, message) in USAGE_ERRORS.items():
        result = CliRunner().invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (case, result.output)
        command = args[0] + " " if message.startswith(args[0]) else ""
        assert lines == [f"genpipe: error: {message} (see 'genpipe {command}--help')"], (case, lines)


def test_a_usage_error_from_the_installed_command_is_one_line(tmp_path: Path):
    proc = run(["genpipe", "promote"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "genpipe: error: promote: Missing argument 'MODEL...'. (see 'genpipe promote --help')"
    ]
    assert proc.stdout == ""


def test_evaluate_dry_run_checks_each_familys_options(tmp_path: Path):
    """`evaluate.options` against each family's options and the shared limits, before any data is read."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    cases = {
        "diffusion_pixel": (
            {"steps": 0},
            "evaluate.options.diffusion_pixel.steps=0: must be an integer in [1, 1000]",
        ),
        "prior_maskgit": (
            {"steps": 0},
            "evaluate.options.prior_maskgit.steps=0: must be an integer in [1, 1000]",
        ),
        "diffusion_latent": (
            {"temperature": 0.5},
            "evaluate.options.diffusion_latent.temperature: unknown sampling option for diffusion_latent",
        ),
        "gan": (
            {"truncation": -1},
            "evaluate.options.gan.truncation=-1: must be null or a finite number in (0, 10]",
        ),
        "vae": (
            {"temperature": float("inf")},
            "evaluate.options.vae.temperature=inf: must be a finite number",
        ),
    }
    params = tmp_path / "params.yaml"
    for model, (options, message) in cases.items():
        params.write_text(yaml.safe_dump({"evaluate": {"options": {model: options}}}))
        result = CliRunner().invoke(app, ["evaluate", model, "--dry-run", "--params", str(params)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (model, result.output)
        assert lines[0].startswith(f"genpipe: error: evaluate: {message}"), lines
