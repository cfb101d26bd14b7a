"""Stage `train_zoo VARIANT`: the classic generative families on data/processed (a DVC `foreach`).

`vae`: conditional VAE (Kingma & Welling 2014; Sohn et al. 2015); `gan`: DCGAN (Radford et al. 2016);
`wgan`: WGAN-GP (Gulrajani et al. 2017); `flow`: Glow (Kingma & Dhariwal 2018); `pixelcnn`: gated
PixelCNN (van den Oord et al. 2016). Each family is a catalog row whose recipe (a ZooFamily:
params section, task, export, registry knobs; components/zoo/families.py) this module wires into
the shared training driver. The evaluate stage judges the samples, and the likelihood families
(VAE: a bound) also on test bits/dim.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from components import catalog
from components.catalog import ModelSpec
from components.config import load_stage
from components.data.shards import image_shape, read_meta
from components.evaluation.batches import LabelledSplit
from components.schema import StrictConfig
from components.training.task import Task
from components.zoo.families import ZooFamily
from pipelines.lineage import repo_root
from pipelines.runtime import print_config
from pipelines.timing import StageClock
from pipelines.training import train_model, variant_sections

STAGE, DATA = "train_zoo", "data/processed"


def tags(variant: str, cfg: StrictConfig) -> dict[str, str]:
    """Registry tags: the family, its own knobs and its default sampling options."""
    spec = catalog.trained_by(STAGE, variant)
    family: ZooFamily = catalog.recipe(spec)
    knobs = {**family.knobs(cfg.model), **cfg.sampling.model_dump()}
    return {"family": spec.family} | {k: str(v) for k, v in knobs.items()}


def task_for(cfg: StrictConfig, spec: ModelSpec, meta: dict) -> tuple[StrictConfig, partial[Task]]:
    """(the variant's config with its unset sizes fitted to the data, its task factory): the stage and
    `genpipe repro --dry-run` both build them here."""
    family: ZooFamily = catalog.recipe(spec)
    shape = image_shape(meta)
    cfg = family.fit_variant(cfg, shape)
    return cfg, partial(family.task, cfg.model, cfg.loop, image_shape=shape, num_classes=meta["num_classes"])


def main(*, params: Path, variant: str, dry_run: bool = False, clock: StageClock | None = None) -> None:
    spec = catalog.trained_by(STAGE, variant)
    family: ZooFamily = catalog.recipe(spec)
    cfg, sections = variant_sections(load_stage(params, STAGE), spec)
    meta = read_meta(repo_root() / DATA)
    num_classes = meta["num_classes"]
    shape = image_shape(meta)
    cfg, task_factory = task_for(cfg, spec, meta)  # unset sizes from the data: logged and hashed as trained
    sections = {**sections, STAGE: cfg}
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    phases = [p.name for p in task_factory().phases]  # builds nothing: checks the shapes before Ray starts
    if dry_run:
        print_config(sections)
        return

    def export(result, out: Path) -> dict[str, float]:
        name = family.task.ema_module
        state = family.finish(
            result.module_states(ema_module=name)[name],
            config=cfg.model,
            image_shape=shape,
            num_classes=num_classes,
            data=lambda: LabelledSplit(repo_root() / DATA, "train"),  # opened only by a family that reads it
        )
        family.export(
            out,
            state=state,
            config=cfg.model,
            image_shape=shape,
            num_classes=num_classes,
            **cfg.sampling.model_dump(),
        )
        keep = ("val/", *(f"{p}/" for p in phases))
        return {k: float(v) for k, v in result.metrics.items() if k.startswith(keep)}

    metrics = train_model(
        spec,
        sections,
        task_factory=task_factory,
        loop=cfg.loop,
        export=export,
        tags=tags(variant, cfg),
        clock=clock,
    )
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.endswith("grad_norm"))
    print(f"{spec.command}: {tags(variant, cfg)}: {shown} -> {spec.folder}")
