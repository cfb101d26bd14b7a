"""Stage `train_diffusion VARIANT`: one EDM-style framework (DDPM, DDIM, VE, EDM, flow matching).

`pixel` trains on data/processed; `latent` on the tokenizer's continuous latents in data/tokens
(Rombach et al. 2022), standardised per channel by train-split statistics stored with the model,
and decodes through the tokenizer the model carries. Which objective, preconditioner and sampler
is config (`dvc exp run -S train_diffusion.pixel.model.objective=flow`), not code. Sampling uses
the EMA weights; the evaluate stage judges the samples.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import torch

from components import catalog
from components.config import load_stage
from components.data.shards import image_shape, read_meta
from components.data.tokens import check_tokenizer, read_token_meta
from components.diffusion.config import DiffusionConfig
from components.diffusion.generator import export as export_diffusion
from components.diffusion.task import DiffusionTask
from components.evaluation.moments import ChannelMoments
from components.stages import DiffusionVariantConfig
from pipelines.lineage import repo_root
from pipelines.runtime import print_config
from pipelines.timing import StageClock
from pipelines.training import train_model, variant_sections

STAGE = "train_diffusion"
TOKENIZER = catalog.TOKENIZER


def resolve_backbone(
    cfg: DiffusionVariantConfig, *, variant: str, channels: int, num_classes: int, size: int
) -> DiffusionConfig:
    """The model config with the backbone's data-given sizes filled in; a set value that disagrees is an error."""
    backbone = cfg.model.backbone
    given = {"in_channels": channels, "num_classes": num_classes}
    for key, value in given.items():
        if key in backbone.model_fields_set and getattr(backbone, key) != value:
            raise ValueError(
                f"{STAGE}.{variant}.model.backbone.{key}={getattr(backbone, key)} but the data has {value}: "
                f"remove the key (it follows the data) or set it to {value}"
            )
    if size % backbone.downsample_factor:
        raise ValueError(
            f"{STAGE}.{variant}.model.backbone.channel_mult has {len(backbone.channel_mult)} levels "
            f"(downsample x{backbone.downsample_factor}), which does not divide the {size}x{size} "
            f"{'latent grid' if variant == 'latent' else 'images'}: use fewer levels"
        )
    return cfg.model.model_copy(update={"backbone": backbone.model_copy(update=given)})


def network(cfg: DiffusionVariantConfig, variant: str, meta: dict) -> tuple[DiffusionConfig, dict | None]:
    """(the model config sized for the data, the latent's shape and compression or None for pixels)."""
    classes, shape = meta["num_classes"], image_shape(meta)
    if variant != "latent":
        return resolve_backbone(
            cfg, variant=variant, channels=shape[0], num_classes=classes, size=shape[1]
        ), None
    (h, w), d = meta["grid"], meta["latent_channels"]
    model = resolve_backbone(cfg, variant=variant, channels=d, num_classes=classes, size=h)
    return model, {"shape": [d, h, w], "compression": d * h * w / math.prod(shape)}


def task_for(
    cfg: DiffusionVariantConfig, model: DiffusionConfig, meta: dict, latent: dict | None
) -> partial[DiffusionTask]:
    """The stage's task factory for `network`'s model; a latent needs its per-channel "mean" and "std"."""
    inputs = (
        {"input_key": "latent", "latent_mean": latent["mean"], "latent_std": latent["std"]}
        if latent
        else {"input_key": "image", "image_shape": image_shape(meta)}
    )
    return partial(
        DiffusionTask, model, cfg.loop, sampling=cfg.sampling, num_classes=meta["num_classes"], **inputs
    )


def latent_stats(tokens_dir: Path, *, batch_rows: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the train split's latents (standardisation stored with the model).

    One streaming pass over the shards, `batch_rows` latents at a time: a split of any size costs one batch.
    """
    meta = read_token_meta(tokens_dir)
    d = meta["latent_channels"]
    moments = ChannelMoments(d)
    for name in meta["shards"]["train"]:
        for record in pq.ParquetFile(Path(tokens_dir) / name).iter_batches(
            batch_size=batch_rows, columns=["latent"]
        ):
            flat = record.column(0).flatten().to_numpy().copy()  # (B * D * h * w,) float32, writable
            moments.update(torch.from_numpy(flat).reshape(record.num_rows, d, -1))  # (B, D, h*w)
    return moments.mean().tolist(), moments.std().clamp_min(1e-6).tolist()


def latent_scaling(tokens_dir: Path, model: DiffusionConfig) -> tuple[list[float], list[float]]:
    """The per-channel (mean, std) stored with a latent model: `DiffusionTask` and the generator map a
    latent z to (z - mean) / std, which has the spread `model.sigma_data` that the preconditioner and
    the noise levels assume (0.5: pixels in [-1, 1]), as EDM2 (Karras et al. 2024) scales its latents.
    Unit-std latents gave the model twice the spread its sigmas were set for."""
    mean, std = latent_stats(tokens_dir)
    return mean, [s / model.sigma_data for s in std]


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
