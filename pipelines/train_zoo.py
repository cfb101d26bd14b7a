"""Stage `train_zoo VARIANT`: the classic generative families on data/processed (a DVC `foreach`).

`vae`: conditional VAE (Kingma & Welling 2014; Sohn et al. 2015); `gan`: DCGAN (Radford et al. 2016);
`wgan`: WGAN-GP (Gulrajani et al. 2017); `flow`: Glow (Kingma & Dhariwal 2018); `pixelcnn`: gated
PixelCNN (van den Oord et al. 2016). Each family is a config, a task and an export in
components/zoo/; this module only wires them into the shared generator skeleton. The evaluate
stage judges the samples, and the likelihood families (VAE: a bound) also on test bits/dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from components import catalog
from components.config import load_stage
from components.data.shards import read_meta
from components.schema import StrictConfig
from components.training.task import Task
from components.zoo import flow, gan, pixelcnn, vae
from pipelines.lineage import repo_root
from pipelines.runtime import print_config
from pipelines.timing import StageClock
from pipelines.training import train_model, variant_sections

STAGE, DATA = "train_zoo", "data/processed"


@dataclass(frozen=True)
class Family:
    """A family's task class, its `export`, and the knobs its registered version is tagged with."""

    task: type[Task]
    export: Callable[..., None]
    knobs: Callable[[Any], dict[str, object]]


def _gan_knobs(m: gan.GANConfig) -> dict[str, object]:
    knobs = {
        "loss": m.loss,
        "n_critic": m.critic_repeats,
        "betas": list(m.adam_betas),
        "mode_seeking": m.mode_seeking,
    }
    return knobs | ({"gp_weight": m.gp_weight} if m.loss == "wgan_gp" else {"d_lr_ratio": m.d_lr_ratio})


FAMILIES = {
    "vae": Family(vae.VAETask, vae.export, lambda m: {"beta": m.beta, "latent_dim": m.latent_dim}),
    "gan": Family(gan.GANTask, gan.export, _gan_knobs),
    "wgan": Family(gan.GANTask, gan.export, _gan_knobs),
    "flow": Family(
        flow.FlowTask, flow.export, lambda m: {"levels": m.levels, "steps_per_level": m.steps_per_level}
    ),
    "pixelcnn": Family(
        pixelcnn.PixelCNNTask, pixelcnn.export, lambda m: {"layers": m.layers, "channels": m.channels}
    ),
}


def tags(variant: str, cfg: StrictConfig) -> dict[str, str]:
    """Registry tags: the family, its own knobs and its default sampling options."""
    knobs = {**FAMILIES[variant].knobs(cfg.model), **cfg.sampling.model_dump()}
    return {"family": variant} | {k: str(v) for k, v in knobs.items()}  # variant == family (validated)


def main(*, params: Path, variant: str, dry_run: bool = False, clock: StageClock | None = None) -> None:
    spec, family = catalog.trained_by(STAGE, variant), FAMILIES[variant]
    cfg, sections = variant_sections(load_stage(params, STAGE), spec)
    meta = read_meta(repo_root() / DATA)
    num_classes = meta["num_classes"]
    image_shape = (meta["channels"], meta["image_size"], meta["image_size"])
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    task_factory = partial(family.task, cfg.model, cfg.loop, image_shape=image_shape, num_classes=num_classes)
    phases = [p.name for p in task_factory().phases]  # builds nothing: checks the shapes before Ray starts
    if dry_run:
        print_config(sections)
        return

    def export(result, out: Path) -> dict[str, float]:
        name = family.task.ema_module
        family.export(
            out,
            state=result.module_states(ema_module=name)[name],
            config=cfg.model,
            image_shape=image_shape,
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
