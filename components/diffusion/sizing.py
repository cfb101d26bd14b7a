"""The diffusion model sized for its data, and a latent model's standardisation: what the stage, the
dry run's estimate and a Ray-free run (benchmarks/gpu_train.py) share."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import torch

from components.data.shards import image_shape
from components.data.tokens import read_token_meta
from components.diffusion.config import DiffusionConfig
from components.diffusion.task import DiffusionTask
from components.evaluation.moments import ChannelMoments
from components.stages import DiffusionVariantConfig

STAGE = "train_diffusion"


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
