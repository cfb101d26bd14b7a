"""Stage `train_prior VARIANT`: the second stage of VQGAN, a transformer over the tokenizer's codes.

`gpt` models a grid left to right (Esser et al. 2021, sec. 3.2); `maskgit` predicts masked tokens
in parallel and decodes in a handful of steps (Chang et al. 2022). Both train on data/tokens and
carry the tokenizer named in data/tokens/meta.json, so the exported folder (and the registry
version) is the whole two-stage model. The evaluate stage judges the samples.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from components import catalog
from components.config import load_stage
from components.data.shards import image_shape
from components.data.tokens import check_tokenizer, read_token_meta
from components.prior.generator import export as export_prior
from components.prior.task import PriorTask
from components.stages import PriorVariantConfig
from pipelines.lineage import repo_root
from pipelines.runtime import print_config
from pipelines.timing import StageClock
from pipelines.training import train_model, variant_sections

STAGE = "train_prior"
DATA, TOKENIZER = catalog.TOKENS, catalog.TOKENIZER


def task_for(cfg: PriorVariantConfig, meta: dict) -> partial[PriorTask]:
    """The stage's task factory on token data described by `meta` (the stage and `genpipe repro --dry-run`)."""
    return partial(
        PriorTask,
        cfg.model,
        cfg.loop,
        grid=tuple(meta["grid"]),
        codebook_size=meta["codebook_size"],
        num_classes=meta["num_classes"],
    )


def main(*, params: Path, variant: str, dry_run: bool = False, clock: StageClock | None = None) -> None:
    spec = catalog.trained_by(STAGE, variant)
    cfg, sections = variant_sections(load_stage(params, STAGE), spec)
    root = repo_root()
    meta = read_token_meta(root / DATA)
    check_tokenizer(meta, root / TOKENIZER)
    grid, codebook_size, num_classes = tuple(meta["grid"]), meta["codebook_size"], meta["num_classes"]
    shape = image_shape(meta)
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    if dry_run:
        print_config(sections)
        return
    task_factory = task_for(cfg, meta)

    def export(result, out: Path) -> dict[str, float]:
        export_prior(
            out,
            state=result.module_states(ema_module=PriorTask.ema_module)["prior"],
            prior=cfg.model,
            sampling=cfg.sampling,
            grid=grid,
            codebook_size=codebook_size,
            num_classes=num_classes,
            image_shape=shape,
            tokenizer_dir=root / TOKENIZER,
        )
        return {k: float(v) for k, v in result.metrics.items() if k.startswith(("val/", "main/"))}

    options = cfg.sampling.options(variant)
    tags = {
        "prior": variant,
        **{k: str(v) for k, v in options.items()},
        "tokenizer_version": str(meta["tokenizer"]["version"]),
    }
    metrics = train_model(
        spec, sections, task_factory=task_factory, loop=cfg.loop, export=export, tags=tags, clock=clock
    )
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(
        f"{spec.command}: {grid[0]}x{grid[1]} tokens of {codebook_size} codes, sampling {json.dumps(options)}: {shown} -> {spec.folder}"
    )
