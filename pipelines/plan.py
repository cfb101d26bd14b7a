"""`genpipe repro --dry-run`: what `genpipe repro` would run, and what it would cost, before anything runs.

The stages are DVC's own plan: `dvc repro --dry --force-downstream ARGS` lists every stage whose
inputs changed and everything downstream of it (a dry run changes no output, so without
--force-downstream DVC would list only the first changed stage of each chain). Each training stage
then gets the estimate line it prints when it starts (pipelines/estimate.py), and the note when the
data is richer than its params were sized for; the total sums them.

The data is described from the params, not read: `prepare`'s source is listed and split without
pixel work (components/data/build.py: plan_dataset), and the token grid is the one the tokenizer
params give on it (pipelines/train_tokenizer.py: fit_model). So a fresh clone, or a changed
`prepare`, is estimated before any stage exists. Nothing trains, no Ray instance starts, MLflow is
not touched.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from components import catalog
from components.catalog import ModelSpec
from components.config import load_stage
from pipelines.estimate import OVERHEAD_S, Estimate, estimate

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def dvc_plan(dvc: list[str], *, env: dict[str, str]) -> tuple[list[str], int, str]:
    """(stages `dvc repro --dry --force-downstream ARGS` would run, in its order; its exit status; its output)."""
    proc = subprocess.run([*dvc, "--dry", "--force-downstream"], env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    stages = [m.group(1) for line in out.splitlines() if (m := STAGE_LINE.match(line))]
    return stages, proc.returncode, out


def planned_meta(params: Path) -> dict:
    """data/processed's meta.json facts that sizes hang on (channels, image_size, num_classes, counts),
    from the `prepare` params: the source listed and split, no image decoded."""
    from components.data.build import plan_dataset
    from pipelines.prepare import preflight

    cfg = preflight(load_stage(params, "prepare")["prepare"])
    plan = plan_dataset(cfg, log=lambda line: print(line, flush=True))
    return {
        "channels": cfg.channels,
        "image_size": cfg.image_size,
        "num_classes": len(plan.source.class_names),
        "counts": {split: len(rows) for split, rows in plan.splits.items()},
    }


def token_meta(params: Path, images: dict) -> dict:
    """data/tokens' meta.json facts: the grid and code size the tokenizer params give on `images`."""
    from pipelines import train_tokenizer

    tok = load_stage(params, train_tokenizer.STAGE)[train_tokenizer.STAGE]
    model = train_tokenizer.fit_model(tok, images)
    side = images["image_size"] // model.autoencoder.downsample_factor
    return {
        **images,
        "grid": [side, side],
        "latent_channels": model.code_dim,
        "codebook_size": model.codebook_size,
    }


def _evaluator_features(params: Path, meta: dict) -> Callable:
    """The perceptual loss's feature maps from an untrained evaluator of the params' size (the FLOPs
    are the trained one's)."""
    from components.evaluation.evaluator import Evaluator

    cfg = load_stage(params, "train_evaluator")["train_evaluator"]
    net = Evaluator.from_config(cfg.model, in_channels=meta["channels"], num_classes=meta["num_classes"])
    return net.requires_grad_(False).feature_maps


def stage_task(spec: ModelSpec, params: Path, meta: dict) -> tuple[dict, object, Callable[[], object]]:
    """(sections, loop, task factory) of `spec`'s training stage: its module's own `task_for`, with an
    untrained evaluator's features for the perceptual loss and unit latent statistics (same FLOPs)."""
    from pipelines import train_diffusion, train_evaluator, train_prior, train_tokenizer, train_zoo
    from pipelines.training import variant_sections

    sections = load_stage(params, spec.stage)
    cfg = sections[spec.stage]
    if spec.variant is not None:
        cfg, sections = variant_sections(sections, spec)
    if spec.name == "evaluator":
        task = train_evaluator.task_for(cfg, meta)
    elif spec.name == "tokenizer":
        model = train_tokenizer.fit_model(cfg, meta)
        task = train_tokenizer.task_for(cfg, model, _evaluator_features(params, meta))
    elif spec.stage == "train_diffusion":
        model, latent = train_diffusion.network(cfg, spec.variant, meta)
        if latent is not None:
            latent |= {"mean": [0.0] * latent["shape"][0], "std": [1.0] * latent["shape"][0]}
        task = train_diffusion.task_for(cfg, model, meta, latent)
    elif spec.stage == "train_prior":
        task = train_prior.task_for(cfg, meta)
    else:  # train_zoo
        cfg, task = train_zoo.task_for(cfg, spec, meta)
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    return sections, cfg.loop, task


def _model_of(stage: str) -> ModelSpec | None:
    """The model a DVC stage (`train_prior@gpt`) trains; None for a stage that trains none."""
    base, _, item = stage.partition("@")
    try:
        spec = catalog.stage(base)
    except ValueError:
        return None
    if not spec.training:
        return None
    return catalog.trained_by(base, item) if item else next(m for m in catalog.MODELS if m.stage == base)


def stage_estimate(spec: ModelSpec, params: Path, metas: dict[str, Callable[[], dict]]) -> Estimate:
    meta = metas[spec.data]()
    sections, loop, task = stage_task(spec, params, meta)
    return estimate(spec, sections, loop=loop, task_factory=task, meta=meta)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def main(*, params: Path, dvc: list[str], env: dict[str, str]) -> int:
    """Print DVC's plan with each training stage's estimate and the total; 0, or DVC's failure."""
    stages, rc, out = dvc_plan(dvc, env=env)
    if rc:
        sys.stdout.write(out)
        return rc
    if not stages:
        print("genpipe repro --dry-run: DVC would run no stage: every stage is up to date")
        return 0
    print(
        f"genpipe repro --dry-run: DVC would run {len(stages)} stage(s) (`dvc repro --dry --force-downstream`):"
    )
    cache: dict[str, dict] = {}

    def images() -> dict:
        if "images" not in cache:
            cache["images"] = planned_meta(params)
        return cache["images"]

    def tokens() -> dict:
        if "tokens" not in cache:
            cache["tokens"] = token_meta(params, images())
        return cache["tokens"]

    metas = {catalog.IMAGES: images, catalog.TOKENS: tokens}
    total, estimated, missing = 0.0, 0, []
    for stage in stages:
        spec = _model_of(stage)
        if spec is None:
            print(f"  {stage}")
            continue
        result = stage_estimate(spec, params, metas)
        for line in result.lines:
            print(f"  {line}")
        if result.seconds is None:
            missing.append(stage)
        else:
            total, estimated = total + result.seconds, estimated + 1
    rest = len(stages) - estimated - len(missing)
    print(
        f"genpipe repro --dry-run: total ~{_duration(total)} for {estimated} training stage(s) "
        f"(~{_duration(OVERHEAD_S)} start-up each included)"
        + (f"; {rest} other stage(s) (prepare, encode, evaluate, ...) not estimated" if rest else "")
        + (f"; no estimate for {', '.join(missing)}" if missing else "")
        + ". Nothing ran."
    )
    return 0
