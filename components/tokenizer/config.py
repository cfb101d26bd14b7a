"""Config of the image tokenizer (VQGAN, Esser et al. 2021): autoencoder, quantizer and loss.

Defaults are the papers' (taming-transformers' ImageNet f=16 VQGAN, VQ-VAE's beta, DALL-E's tau
schedule, FSQ's levels for ~2^10 codes); params.yaml sets a small model for the digits pipeline.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from components.nn.autoencoder import DOWNSAMPLE_FACTORS, AutoencoderConfig
from components.schema import StrictConfig

TOKEN_GRID = (4, 8)  # token grid sides the priors are sized for: 16x16 -> 4x4, 32x32 -> 8x8
PREFERRED_FACTOR = 4  # f = 4 where it leaves a grid in range (LlamaGen's small-image choice)

QuantizerKind = Literal["vq", "gumbel", "fsq"]


class QuantizerConfig(StrictConfig):
    """Which quantizer and its knobs; knobs of the other kinds are ignored."""

    kind: QuantizerKind = "vq"
    codebook_size: int = Field(default=1024, ge=2, description="K; for fsq it must equal prod(levels)")
    code_dim: int | None = Field(
        default=None, ge=1, description="None: z_channels (vq, gumbel), len(levels) (fsq)"
    )
    # vq (van den Oord et al. 2017)
    beta: float = Field(default=0.25, ge=0)  # commitment weight
    ema: bool = False  # EMA codebook (Razavi et al. 2019) instead of the codebook loss
    ema_decay: float = Field(default=0.99, gt=0, lt=1)  # also the decay of the usage counts
    cosine: bool = False  # l2-normalised codes and inputs (ViT-VQGAN)
    restart_dead: bool = True  # replace dead codes by recent encoder outputs (Jukebox)
    dead_threshold: float = Field(
        default=1.0, gt=0, description="EMA count per update below which a code is dead"
    )
    # gumbel (Jang et al. 2017; DALL-E dVAE)
    tau_start: float = Field(default=1.0, gt=0)
    tau_end: float = Field(default=1.0 / 16, gt=0)
    anneal_steps: int = Field(default=150_000, ge=1)  # DALL-E anneals over its first 150k updates
    kl_weight: float = Field(default=5e-4, ge=0)  # taming-transformers' GumbelQuantize
    diversity_weight: float = Field(default=0.0, ge=0)  # KL(batch-mean q || uniform), wav2vec 2.0
    hard: bool = False  # straight-through hard one-hot in training (else soft relaxation)
    # fsq (Mentzer et al. 2023, table 1: ~2^10 codes)
    levels: tuple[int, ...] = (8, 5, 5, 5)

    @model_validator(mode="after")
    def _cross_field(self) -> QuantizerConfig:
        if self.kind == "fsq":
            if not self.levels or any(n < 2 for n in self.levels):
                raise ValueError(f"fsq levels={list(self.levels)} must be one or more integers >= 2")
            implied = math.prod(self.levels)
            if self.codebook_size != implied:
                raise ValueError(
                    f"fsq: codebook_size={self.codebook_size} must equal prod(levels)={implied} "
                    f"(levels={list(self.levels)}); set codebook_size: {implied} or change levels"
                )
            if self.code_dim is not None and self.code_dim != len(self.levels):
                raise ValueError(
                    f"fsq: code_dim={self.code_dim} must be null or len(levels)={len(self.levels)}"
                )
        if self.kind == "gumbel" and self.tau_end > self.tau_start:
            raise ValueError(f"gumbel: tau_end={self.tau_end} must not exceed tau_start={self.tau_start}")
        return self


class DiscConfig(StrictConfig):
    """PatchGAN discriminator and its loss (taming-transformers' VQLPIPSWithDiscriminator)."""

    loss: Literal["hinge", "non_saturating"] = "hinge"
    weight: float = Field(default=0.8, ge=0, description="0: no discriminator")  # taming's disc_weight
    start_step: int = Field(default=250_001, ge=0)  # taming ImageNet f=16; params.yaml sets a short run
    layers: int = Field(default=3, ge=1, description="n_layers: needs images of at least 3*2**layers px")
    channels: int = Field(default=64, ge=8)
    lr_ratio: float = Field(default=1.0, gt=0, description="discriminator lr / generator lr")
    # none: no normalisation; group: per-sample GroupNorm, which let the discriminator go input-blind
    # on 16x16 digits (components/nn/discriminator.py). taming's BatchNorm has batch statistics.
    norm: Literal["none", "group"] = "none"


class LossConfig(StrictConfig):
    """Reconstruction + perceptual + codebook + adaptively weighted adversarial loss (eq. 5-7)."""

    recon: Literal["l1", "l2"] = "l1"  # taming uses L1 with LPIPS
    recon_weight: float = Field(default=1.0, ge=0)
    perceptual_weight: float = Field(default=1.0, ge=0, description="needs a feature network; 0: off")
    codebook_weight: float = Field(default=1.0, ge=0)
    disc: DiscConfig = DiscConfig()
    adaptive_weight: bool = True  # eq. 7; else the adversarial weight is disc.weight
    adaptive_max: float = Field(default=1e4, gt=0)  # clamp of lambda, as in taming

    @model_validator(mode="after")
    def _some_reconstruction(self) -> LossConfig:
        if self.recon_weight == 0 and self.perceptual_weight == 0:
            raise ValueError("recon_weight and perceptual_weight are both 0: nothing to reconstruct with")
        return self


class TokenizerConfig(StrictConfig):
    """A VQGAN: the `model` block of `train_tokenizer`, and the config.json of an exported tokenizer."""

    autoencoder: AutoencoderConfig = AutoencoderConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    loss: LossConfig = LossConfig()

    @model_validator(mode="wrap")
    @classmethod
    def _implied_factor(cls, data, handler):
        """A missing autoencoder.downsample_factor is implied by channel_mult, and stays unset (it may
        follow the data: `levels_follow_data`)."""
        ae = data.get("autoencoder") if isinstance(data, dict) else None
        mult = ae.get("channel_mult") if isinstance(ae, dict) and "downsample_factor" not in ae else None
        if not isinstance(mult, list | tuple) or not mult:
            return handler(data)
        cfg = handler({**data, "autoencoder": {**ae, "downsample_factor": 2 ** (len(mult) - 1)}})
        cfg.autoencoder.model_fields_set.discard("downsample_factor")  # the user did not set it
        return cfg

    @property
    def levels_follow_data(self) -> bool:
        """True when autoencoder.downsample_factor was not given: the level count may follow the data."""
        return "downsample_factor" not in self.autoencoder.model_fields_set

    @property
    def code_dim(self) -> int:
        """Channels of the quantized latent z_q."""
        q = self.quantizer
        if q.kind == "fsq":
            return len(q.levels)
        return q.code_dim if q.code_dim is not None else self.autoencoder.z_channels

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size


def fit_downsampling(
    image_size: int, *, grid: tuple[int, int] = TOKEN_GRID, prefer: int = PREFERRED_FACTOR
) -> int | None:
    """The factor f whose token grid image_size/f is whole and within `grid`, nearest to `prefer`; None if none."""
    fits = [f for f in DOWNSAMPLE_FACTORS if image_size % f == 0 and grid[0] <= image_size // f <= grid[1]]
    if not fits:
        return None
    return min(fits, key=lambda f: (abs(math.log2(f / prefer)), f))


def with_levels(ae: AutoencoderConfig, factor: int) -> AutoencoderConfig:
    """`ae` with log2(factor)+1 levels: channel_mult cut, or extended by its last entry."""
    levels = int(math.log2(factor)) + 1
    mult = tuple(ae.channel_mult[:levels]) + (ae.channel_mult[-1],) * max(0, levels - len(ae.channel_mult))
    return AutoencoderConfig(**{**ae.model_dump(), "channel_mult": mult, "downsample_factor": factor})


def fit_to_data(
    model: TokenizerConfig,
    *,
    channels: int,
    image_size: int,
    grid: tuple[int, int] = TOKEN_GRID,
    key: str = "autoencoder",
    grid_key: str = "token_grid",
) -> TokenizerConfig:
    """`model` with its data-given sizes filled in; a set value the data contradicts is an error naming `key`.

    in_channels follows the images unless set. Without an explicit downsample_factor the level count
    follows the image size: f = 4 where the token grid image_size/f stays within `grid`, else the
    nearest factor that does (channel_mult cut, or extended by its last entry).
    """
    ae = model.autoencoder
    if "in_channels" in ae.model_fields_set and ae.in_channels != channels:
        raise ValueError(
            f"{key}.in_channels={ae.in_channels} but the prepared images have {channels} channel(s): "
            f"remove the key (it follows the data) or set it to {channels}"
        )
    if model.levels_follow_data:
        factor = fit_downsampling(image_size, grid=grid)
        if factor is None:
            raise ValueError(
                f"no downsampling in {list(DOWNSAMPLE_FACTORS)} gives {image_size}x{image_size} images a token "
                f"grid within {grid_key}={list(grid)}: widen it or set {key}.downsample_factor"
            )
        ae = with_levels(ae, factor)
    elif image_size % ae.downsample_factor:
        raise ValueError(
            f"{key}.downsample_factor={ae.downsample_factor} does not divide prepare.image_size={image_size}"
        )
    return model.model_copy(update={"autoencoder": ae.model_copy(update={"in_channels": channels})})
