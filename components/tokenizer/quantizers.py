"""Quantizers by name: "vq" (VQ-VAE, optional EMA/cosine/restart), "gumbel" (Gumbel-softmax), "fsq"."""

from __future__ import annotations

from collections.abc import Callable

from components.tokenizer.base import CodeUsage, Quantizer, QuantizerOutput
from components.tokenizer.config import QuantizerConfig
from components.tokenizer.fsq import FiniteScalarQuantizer
from components.tokenizer.gumbel import GumbelQuantizer
from components.tokenizer.vq import VectorQuantizer

__all__ = ["QUANTIZERS", "CodeUsage", "Quantizer", "QuantizerOutput", "build_quantizer"]


def _vq(cfg: QuantizerConfig, dim: int) -> Quantizer:
    return VectorQuantizer(
        codebook_size=cfg.codebook_size,
        dim=dim,
        beta=cfg.beta,
        ema=cfg.ema,
        decay=cfg.ema_decay,
        cosine=cfg.cosine,
        restart_dead=cfg.restart_dead,
        dead_threshold=cfg.dead_threshold,
    )


def _gumbel(cfg: QuantizerConfig, dim: int) -> Quantizer:
    return GumbelQuantizer(
        codebook_size=cfg.codebook_size,
        dim=dim,
        kl_weight=cfg.kl_weight,
        diversity_weight=cfg.diversity_weight,
        hard=cfg.hard,
        tau=cfg.tau_start,
    )


def _fsq(cfg: QuantizerConfig, dim: int) -> Quantizer:
    if dim != len(cfg.levels):
        raise ValueError(
            f"fsq with levels={list(cfg.levels)} quantizes {len(cfg.levels)} channels, got dim={dim}"
        )
    return FiniteScalarQuantizer(levels=cfg.levels)


QUANTIZERS: dict[str, Callable[[QuantizerConfig, int], Quantizer]] = {
    "vq": _vq,
    "gumbel": _gumbel,
    "fsq": _fsq,
}


def build_quantizer(cfg: QuantizerConfig, *, dim: int) -> Quantizer:
    """The quantizer named by `cfg.kind`, quantizing `dim` channels."""
    if cfg.kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {cfg.kind!r}; valid: {sorted(QUANTIZERS)}")
    return QUANTIZERS[cfg.kind](cfg, dim)
