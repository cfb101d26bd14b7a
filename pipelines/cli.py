"""The `genpipe` command: one sub-command per DVC stage, plus registry helpers."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="genpipe",
    help="Train generative image models as a DVC pipeline on Ray Train, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (default: ./params.yaml)")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="validate params and inputs, print the config, do no work")
]

#: Errors that are the user's input, not a bug: one line, exit 1 (GENPIPE_DEBUG=1 shows the traceback).
USER_ERRORS = (ValueError, OSError, ArithmeticError, KeyError, RuntimeError)


def _run_stage(module: str, params: Path, dry_run: bool, **args: str) -> None:
    from pipelines.runtime import CLOCK, fail

    try:
        CLOCK.mark("cli")
        stage = importlib.import_module(f"pipelines.{module}")
        CLOCK.mark("imported")
        stage.main(params=params, dry_run=dry_run, **args)
    except USER_ERRORS as err:
        if os.environ.get("GENPIPE_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"{module}: {message}")


def _stage(name: str, summary: str) -> None:
    def command(params: ParamsOpt = Path("params.yaml"), dry_run: DryRunOpt = False) -> None:
        _run_stage(name, params, dry_run)

    command.__doc__ = summary
    app.command(name, help=summary)(command)


STAGES = {
    "prepare": "Turn the configured image source into validated Parquet shards in data/processed/.",
    "train_evaluator": "Train the classifier whose features every Fréchet distance, perceptual loss and accuracy uses.",
    "train_tokenizer": "Train the VQGAN image tokenizer (codebook, perceptual and adversarial losses).",
    "encode": "Encode every split into token grids and latents in data/tokens/ with the tokenizer.",
}
for _name, _summary in STAGES.items():
    _stage(_name, _summary)


def _variant_stage(name: str, summary: str, arg: str, choices: str) -> None:
    """A DVC `foreach` stage: `genpipe <name> <variant>`."""

    def command(variant: str, params: ParamsOpt = Path("params.yaml"), dry_run: DryRunOpt = False) -> None:
        _run_stage(name, params, dry_run, **{arg: variant})

    # Built here, not in the signature: string annotations cannot see this function's locals.
    command.__annotations__["variant"] = Annotated[str, typer.Argument(metavar=arg.upper(), help=choices)]
    command.__doc__ = summary
    app.command(name, help=f"{summary} {arg.upper()}: {choices}.")(command)


_variant_stage(
    "train_diffusion",
    "Train a diffusion model (DDPM, DDIM, VE, EDM or flow matching) in pixel or latent space.",
    "variant",
    "pixel | latent",
)
_variant_stage(
    "train_prior", "Train a transformer prior over the tokenizer's codes.", "variant", "gpt | maskgit"
)
_variant_stage(
    "train_zoo",
    "Train a classic family: VAE, GAN, WGAN-GP, normalizing flow or PixelCNN.",
    "variant",
    "vae | gan | wgan | flow | pixelcnn",
)
_variant_stage(
    "evaluate",
    "Judge one generator: N samples on fixed seeds, FD, conditional accuracy, precision/recall, grid.",
    "model",
    "a folder name under models/ (diffusion_pixel, diffusion_latent, prior_gpt, ...)",
)
_stage(
    "report", "Gather every evaluation into reports/evaluate.json and the results table reports/results.md."
)


@app.command(
    "repro",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def repro(ctx: typer.Context, params: ParamsOpt = Path("params.yaml")) -> None:
    """`dvc repro [ARGS]` with one local Ray instance shared by every stage, then a per-stage summary."""
    from pipelines.repro import main as run_repro

    raise typer.Exit(run_repro(params=params, args=list(ctx.args)))


@app.command("models")
def models(params: ParamsOpt = Path("params.yaml")) -> None:
    """List registered genpipe model versions with their aliases."""
    from components.config import load_stage
    from components.registry.registry import list_versions
    from pipelines.runtime import tracking_uri

    uri = tracking_uri(load_stage(params, "prepare")["mlflow"])
    rows = list_versions(tracking_uri=uri)
    if not rows:
        typer.echo("no registered genpipe models")
    for r in rows:
        aliases = ",".join(r["aliases"]) or "-"
        typer.echo(f"{r['name']:<28} v{r['version']:<4} aliases={aliases:<22} run={r['run_id']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
