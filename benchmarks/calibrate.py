"""`make calibrate`: measure the runs that `genpipe repro --dry-run`'s estimates are fitted to.

Every training stage twice, as `genpipe` runs it (Ray Train, the params' workers): the shipped params
on the built-in digits at their own steps, then the rgb32 preset on 32x32 RGB glyphs at a quarter
of its steps (at least 100; validations, checkpoints and sample grids as often per step as in the
full run, so each step carries its share of them). Each run's training seconds (first to last step,
reports/train_<model>.json), steps, batch, parameters and FLOPs per sample (counted as the estimate
counts them) are printed as the `Run(...)` rows of pipelines/estimate.py's REFERENCES, with a table of
milliseconds per step, and written to reports/calibrate.json.

It rewrites params.yaml and the data, and removes the workspace's checkpoints (a run that resumes
would measure nothing): run it in a scratch clone (`--workspace`, as `make calibrate` does), on an
idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from components import catalog
from components.io import write_json
from pipelines import estimate, plan

PRESET = "rgb32"
FRACTION, MIN_STEPS = 0.25, 100
SCALED = ("val_every", "checkpoint_every", "sample_every", "warmup_steps")  # kept in step with `steps`


def genpipe(workspace: Path, *args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "genpipe"), *args]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=workspace, check=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def write_preset(workspace: Path, name: str, overlay: dict) -> None:
    """A one-off preset in the workspace's presets/, applied with `genpipe preset` (validated there)."""
    import yaml

    (workspace / "presets").mkdir(exist_ok=True)
    (workspace / "presets" / f"{name}.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    genpipe(workspace, "preset", name)


def shortened(spec: catalog.ModelSpec, loop, *, fraction: float) -> dict:
    """The params overlay that runs `spec`'s stage for `fraction` of its steps (>= MIN_STEPS)."""
    steps = min(loop.steps, max(MIN_STEPS, round(loop.steps * fraction)))
    values = {"steps": steps}
    for key in SCALED:
        if getattr(loop, key):
            values[key] = max(1, round(getattr(loop, key) * steps / loop.steps))
    section: dict = {"loop": values}
    if spec.variant:
        section = {spec.variant: section}
    return {spec.stage: section}


def measure(workspace: Path, *, label: str, fraction: float | None) -> dict[str, estimate.Run]:
    """Train every model in the catalog's order (encode after the tokenizer); {model: its Run}."""
    params = workspace / "params.yaml"
    genpipe(workspace, "prepare")
    images = plan.planned_meta(params)
    runs: dict[str, estimate.Run] = {}
    for spec in catalog.MODELS:
        if spec.data == catalog.TOKENS and not any(catalog.model(n).data == catalog.TOKENS for n in runs):
            genpipe(workspace, "encode")  # this phase's tokenizer's codes
        meta = plan.token_meta(params, images) if spec.data == catalog.TOKENS else images
        if fraction is not None:
            loop = plan.stage_task(spec, params, meta)[1]
            write_preset(workspace, f"calibrate-{spec.name}", shortened(spec, loop, fraction=fraction))
        _, loop, factory = plan.stage_task(spec, params, meta)
        count, flops = estimate.step_cost(factory, estimate.synthetic_batch(spec, meta))
        genpipe(workspace, *spec.command.split("@"))
        report = json.loads((workspace / "reports" / f"train_{spec.name}.json").read_text())
        runs[spec.name] = estimate.Run(
            round(report["train_seconds"], 1), loop.steps, loop.batch_size, count, round(flops, -4)
        )
        print(f"{label} {spec.name}: {runs[spec.name]}", flush=True)
    return runs


def digits(workspace: Path, fraction: float) -> dict[str, estimate.Run]:
    """The shipped params at their own steps (`fraction` is the preset phase's)."""
    return measure(workspace, label="digits", fraction=None)


def rgb32(workspace: Path, fraction: float) -> dict[str, estimate.Run]:
    genpipe(workspace, "preset", PRESET)
    write_preset(workspace, "calibrate-glyphs", {"prepare": {"source": "builtin:glyphs"}})
    return measure(workspace, label=PRESET, fraction=fraction)


PHASES = {"digits": digits, PRESET: rgb32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="a scratch clone of genpipe")
    parser.add_argument("--fraction", type=float, default=FRACTION, help="of the preset's steps")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--out", type=Path, default=Path("reports/calibrate.json"))
    args = parser.parse_args()
    ws = args.workspace.resolve()
    if not (ws / "dvc.yaml").is_file():
        raise SystemExit(f"calibrate: {ws} is not a genpipe clone (no dvc.yaml)")
    shipped = (ws / "params.yaml").read_text()
    start = time.perf_counter()
    runs: dict[str, dict[str, estimate.Run]] = {}
    for phase in args.phases:
        (ws / "params.yaml").write_text(shipped)  # each phase starts from the params as shipped
        shutil.rmtree(ws / ".genpipe" / "ray_results", ignore_errors=True)  # a measured run never resumes
        runs[phase] = PHASES[phase](ws, args.fraction)
    print(f"\n{(time.perf_counter() - start) / 60:.0f} min in all\n")
    rows = {name: {phase: vars(r[name]) for phase, r in runs.items()} for name in next(iter(runs.values()))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, rows)
    if len(runs) < len(PHASES):
        return
    print("| model | digits: ms/step | GFLOP/step | rgb32: ms/step | GFLOP/step |\n|---|---:|---:|---:|---:|")
    for name, d in runs["digits"].items():
        r = runs[PRESET][name]
        print(
            f"| {name} | {d.step_s * 1e3:.0f} | {d.step_flops / 1e9:.2f} | {r.step_s * 1e3:.0f} | "
            f"{r.step_flops / 1e9:.2f} |"
        )
    print("\nREFERENCES = {")
    for name, d in runs["digits"].items():
        print(f'    "{name}": Reference(\n        {d},\n        {runs[PRESET][name]},\n    ),')
    print("}")


if __name__ == "__main__":
    main()
