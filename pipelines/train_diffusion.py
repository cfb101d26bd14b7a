"""Stage `train_diffusion VARIANT`: one EDM-style framework (DDPM, DDIM, VE, EDM, flow matching).

`pixel` trains on data/processed; `latent` on the tokenizer's continuous latents in data/tokens
(Rombach et al. 2022), standardised per channel by train-split statistics stored with the model,
and decodes through the tokenizer the model carries. Which objective, preconditioner and sampler
is config (`dvc exp run -S train_diffusion.pixel.model.objective=flow`), not code. Sampling uses
the EMA weights; the evaluate stage judges the samples.
"""

from __future__ import annotations

from pathlib import Path

from components import catalog
from components.config import load_stage
from components.data.shards import image_shape, read_meta
from components.data.tokens import check_tokenizer, read_token_meta
from components.diffusion.generator import export as export_diffusion
from components.diffusion.sizing import latent_scaling, network, task_for
from components.diffusion.task import DiffusionTask
from pipelines.lineage import repo_root
from pipelines.runtime import print_config
from pipelines.timing import StageClock
from pipelines.training import train_model, variant_sections

STAGE = "train_diffusion"
TOKENIZER = catalog.TOKENIZER


def main(*, params: Path, variant: str, dry_run: bool = False, clock: StageClock | None = None) -> None:
    spec = catalog.trained_by(STAGE, variant)
    cfg, sections = variant_sections(load_stage(params, STAGE), spec)
    root = repo_root()
    # data/tokens/meta.json repeats the image facts, so latent diffusion needs no data/processed
    meta = read_token_meta(root / spec.data) if variant == "latent" else read_meta(root / spec.data)
    if variant == "latent":  # latents from another tokenizer would decode to nonsense
        check_tokenizer(meta, root / TOKENIZER)
    num_classes = meta["num_classes"]
    shape = image_shape(meta)
    model, latent = network(cfg, variant, meta)
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    if dry_run:
        print_config(sections)
        return
    if latent is not None:
        latent["mean"], latent["std"] = latent_scaling(root / spec.data, model)
    task_factory = task_for(cfg, model, meta, latent)

    def export(result, out: Path) -> dict[str, float]:
        state = result.module_states(ema_module=DiffusionTask.ema_module)["denoiser"]
        export_diffusion(
            out,
            denoiser_state=state,
            model=model,
            sampling=cfg.sampling,
            image_shape=shape,
            num_classes=num_classes,
            latent=latent,
            tokenizer_dir=root / TOKENIZER if latent else None,
        )
        out_metrics = {k: float(v) for k, v in result.metrics.items() if k.startswith(("val/", "main/"))}
        if latent:
            out_metrics["compression"] = latent["compression"]
        return out_metrics

    s = cfg.sampling
    tags = {
        "objective": model.objective,
        "sampler": s.sampler,
        "steps": str(s.steps),
        "guidance": str(s.guidance),
    }
    metrics = train_model(
        spec, sections, task_factory=task_factory, loop=cfg.loop, export=export, tags=tags, clock=clock
    )
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(
        f"{spec.command}: {model.objective} ({s.sampler}, {s.steps} steps, guidance {s.guidance}): {shown} -> {spec.folder}"
    )
