"""The `genpipe` command: one sub-command per DVC stage, plus registry helpers."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from components import catalog


class OneLineUsage(TyperGroup):
    """Every usage error (missing argument, bad value, unknown option or command) of every command as
    the project's one line, `genpipe: error: COMMAND: what (see 'genpipe COMMAND --help')`, exit 2,
    instead of typer's boxed usage; help, `typer.Exit` and the commands' own errors are unchanged."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            print("genpipe: error: aborted", file=sys.stderr)
            sys.exit(1)
        except typer.TyperException as err:  # click's exceptions (typer vendors click as typer._click)
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `genpipe`: the help, as before
                err.show()
                sys.exit(err.exit_code)
            print(f"genpipe: error: {_usage_line(err)}", file=sys.stderr)
            sys.exit(err.exit_code)
        sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(code) comes back as its code


def _usage_line(err: typer.TyperException) -> str:
    """`COMMAND: message (see 'genpipe COMMAND --help')` for a usage error (it has a context)."""
    ctx, names = getattr(err, "ctx", None), []
    if ctx is None:
        return err.format_message()
    while ctx.parent is not None:  # the sub-command path, without the root's name
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    where = " ".join(names)
    prefix, see = (f"{where}: ", f"genpipe {where} --help") if where else ("", "genpipe --help")
    return f"{prefix}{err.format_message()} (see '{see}')"


app = typer.Typer(
    name="genpipe",
    help="Train generative image models as a DVC pipeline on Ray Train, tracked in MLflow.",
    cls=OneLineUsage,
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
    from pipelines.runtime import fail
    from pipelines.timing import StageClock

    try:
        clock = StageClock()  # this stage's timing line, handed to the driver
        clock.mark("cli")
        stage = importlib.import_module(f"pipelines.{module}")
        clock.mark("imported")
        timed = {"clock": clock} if catalog.stage(module).training else {}
        stage.main(params=params, dry_run=dry_run, **timed, **args)
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


def _variant_stage(name: str, summary: str, arg: str, choices: str) -> None:
    """A DVC `foreach` stage: `genpipe <name> <variant>`."""

    def command(variant: str, params: ParamsOpt = Path("params.yaml"), dry_run: DryRunOpt = False) -> None:
        _run_stage(name, params, dry_run, **{arg: variant})

    # Built here, not in the signature: string annotations cannot see this function's locals.
    command.__annotations__["variant"] = Annotated[str, typer.Argument(metavar=arg.upper(), help=choices)]
    command.__doc__ = summary
    app.command(name, help=f"{summary} {arg.upper()}: {choices}.")(command)


for _spec in catalog.STAGES:  # every DVC stage but promote (decides several models) and evaluate (below)
    if _spec.name in ("promote", "evaluate"):
        continue
    if _spec.arg:
        _variant_stage(_spec.name, _spec.summary, _spec.arg, " | ".join(_spec.variants))
    else:
        _stage(_spec.name, _spec.summary)


_EVALUATE = catalog.stage("evaluate")


@app.command("evaluate", help=f"{_EVALUATE.summary} MODEL: {' | '.join(_EVALUATE.variants)}.")
def evaluate_command(
    model: Annotated[
        str | None, typer.Argument(metavar="MODEL", help="the generator to judge (omit with --samples)")
    ] = None,
    samples: Annotated[
        Path | None,
        typer.Option(
            "--samples", help="score this sample set instead (.npz, .npy or image folder; docs/contracts.md)"
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model", help="with --samples: the generator the set stands for")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="with --samples: also write the JSON here")
    ] = None,
    dump_samples: Annotated[
        Path | None,
        typer.Option("--dump-samples", help="write the judged set to this .npz; reports/ untouched"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    dry_run: DryRunOpt = False,
) -> None:
    if samples is not None and model is not None:
        raise typer.BadParameter("give MODEL or --samples PATH (with --model MODEL), not both")
    if samples is None and model_name is not None:
        raise typer.BadParameter("--model goes with --samples; to judge a generator give it as MODEL")
    args = {"model": model if samples is None else model_name, "samples": samples, "out": out}
    _run_stage("evaluate", params, dry_run, **args, dump_samples=dump_samples)


@app.command("results")
def results_command(
    check: Annotated[
        bool,
        typer.Option("--check", help="write nothing; exit 1 if README/BENCHMARKS drift from the reports"),
    ] = False,
    write_docs: Annotated[
        bool,
        typer.Option("--write-docs", help="rewrite the docs also when the reports come from other data"),
    ] = False,
) -> None:
    """Rewrite the results table in README.md and BENCHMARKS.md from reports/ (built-in default data only)."""
    from pipelines import results

    _registry_command("results", lambda: results.main(check=check, write_docs=write_docs))


@app.command(
    "repro",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def repro(
    ctx: typer.Context,
    params: ParamsOpt = Path("params.yaml"),
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="print the stages DVC would run and each training stage's estimate; run none"
        ),
    ] = False,
) -> None:
    """`dvc repro [ARGS]` with one local Ray instance shared by every stage, then a per-stage summary."""
    from pipelines.repro import main as run_repro

    # a bad `prepare` or tokenizer param (dry run), or no dvc to run, is one line, as in a stage
    raise typer.Exit(
        _registry_command("repro", lambda: run_repro(params=params, args=list(ctx.args), dry_run=dry_run))
    )


@app.command("preset")
def preset_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="a presets/NAME.yaml overlay, e.g. rgb32")],
    params: ParamsOpt = Path("params.yaml"),
    sets: Annotated[
        bool, typer.Option("--sets", help="print the change as `dvc exp run -S` arguments; write nothing")
    ] = False,
) -> None:
    """Merge a params preset (presets/NAME.yaml) into params.yaml, comments kept (docs/own-images.md)."""
    from pipelines import preset

    _registry_command(
        "preset", lambda: typer.echo("\n".join(preset.main(params=params, name=name, sets=sets)))
    )


exp_app = typer.Typer(help="DVC experiments the way `genpipe repro` runs the pipeline.", no_args_is_help=True)
app.add_typer(exp_app, name="exp")


@exp_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exp_run(ctx: typer.Context, params: ParamsOpt = Path("params.yaml")) -> None:
    """`dvc exp run [ARGS]` (e.g. `-S section.key=value`) as `genpipe repro` runs `dvc repro`."""
    from pipelines.repro import main as run_repro

    raise typer.Exit(
        _registry_command(
            "exp run", lambda: run_repro(params=params, args=list(ctx.args), command=("exp", "run"))
        )
    )


def _registry_command(label: str, call):
    """Run a command and return its value; a refusal or bad input is one line and exit 1, like a stage."""
    from pipelines.runtime import fail

    try:
        return call()
    except USER_ERRORS as err:
        if os.environ.get("GENPIPE_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"{label}: {message}")


ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL", help="a registered name (genpipe-diffusion) or a models/ folder (diffusion_pixel)"
    ),
]


@app.command("models")
def models(
    params: ParamsOpt = Path("params.yaml"),
    lineage: Annotated[
        str | None,
        typer.Option("--lineage", metavar="MODEL@ALIAS", help="print that version's lineage tags instead"),
    ] = None,
) -> None:
    """List registered genpipe model versions with their aliases and key eval figures."""
    from pipelines import promote

    def show() -> None:
        lines = (
            promote.lineage(params=params, target=lineage) if lineage else promote.models_table(params=params)
        )
        typer.echo("\n".join(lines))

    _registry_command("models", show)


@app.command("promote")
def promote_command(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL...",
            help="registered names (genpipe-diffusion) or models/ folders (diffusion_pixel), each decided alone",
        ),
    ],
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="gate metric from the version's eval.figures (fid_over_floor, cond_accuracy, ...)",
        ),
    ] = "fid_over_floor",
    margin: Annotated[float, typer.Option("--margin", help="how much the challenger must win by")] = 0.0,
    params: ParamsOpt = Path("params.yaml"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="decide and print, change nothing")] = False,
) -> None:
    """Move `champion` to the `challenger` version when it beats the champion on the gate metric."""
    from pipelines import promote

    def run() -> None:  # every model is decided; the exit is 1 only if some model's outcome failed
        failed = promote.main_many(
            params=params, models=models, metric=metric, margin=margin, dry_run=dry_run
        )
        if len(failed) > 1:
            raise RuntimeError(f"{len(failed)} of {len(models)} models not decided: {'; '.join(failed)}")
        if failed:
            raise RuntimeError(failed[0])

    _registry_command("promote", run)


@app.command("rollback")
def rollback_command(model: ModelArg, params: ParamsOpt = Path("params.yaml")) -> None:
    """Give `champion` back to the version the current champion replaced; that one is never promoted again."""
    from pipelines import promote

    _registry_command("rollback", lambda: promote.rollback_main(params=params, model=model))


@app.command("sample")
def sample_command(
    target: Annotated[
        str,
        typer.Argument(metavar="MODEL@ALIAS", help="e.g. genpipe-diffusion@champion, diffusion_pixel@v3"),
    ],
    n: Annotated[int, typer.Option("-n", help="number of images")] = 64,
    out: Annotated[Path, typer.Option("--out", help="grid PNG to write")] = Path("samples.png"),
    label: Annotated[
        int | None,
        typer.Option("--label", help="class of every image (-1: unconditional; default: each class in turn)"),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    sampler: Annotated[
        str | None, typer.Option("--sampler", help="diffusion: ddpm, ddim, euler, heun")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", metavar="KEY=VALUE", help="any other sampling option")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per predict call")] = 16,
    nrow: Annotated[int | None, typer.Option("--nrow", help="grid columns")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Sample a registered generator (its pyfunc model) into a PNG grid."""
    from pipelines import sample

    def run() -> None:
        named = {"sampler": sampler, "steps": steps, "guidance": guidance, "temperature": temperature}
        options = {k: v for k, v in named.items() if v is not None}
        options.update(sample.parse_option(text) for text in option or [])
        sample.main(
            params=params, target=target, n=n, out=out, label=label, seed=seed,
            batch_size=batch_size, nrow=nrow, options=options,
        )  # fmt: skip

    _registry_command("sample", run)


app.command("serve")(importlib.import_module("pipelines.serve").command)  # its server lives in serve.py


def main() -> None:
    app()


if __name__ == "__main__":
    main()
