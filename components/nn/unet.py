"""The noise- and class-conditioned UNet that diffusion's preconditioners wrap (pixel or latent space).

ADM (Dhariwal & Nichol 2021) in small, as in EDM's `DhariwalUNet` (Karras et al. 2022): per level
`num_res_blocks` residual blocks whose second GroupNorm is modulated by the embedding e of the noise
level and the class (AdaGN: norm(h) * (1 + scale(e)) + shift(e)), self-attention at chosen levels,
skip connections from every encoder block to the decoder. The noise level comes in as the
preconditioner's c_noise, any real number (EDM: ln(sigma)/4; DDPM: the timestep index; flow
matching: t), through sinusoidal features: "positional" (frequencies 1 .. 1/10^4, EDM's choice for
VP and EDM) or "fourier" (fixed random frequencies, scale 16; EDM's choice for VE). Labels in
[0, num_classes) pick a learned embedding; label == num_classes is the empty class that
classifier-free guidance trains with dropped labels and samples unconditionally from.
The output layer starts at zero (ADM's zero_module), so an untrained net predicts 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components.nn.blocks import AttnBlock, Downsample, Upsample, group_norm
from components.schema import StrictConfig


class UNetConfig(StrictConfig):
    """UNet architecture; the defaults are a ~1M-parameter model for 16x16 single-channel digits."""

    in_channels: int = Field(default=1, ge=1, description="image (or latent) channels, also the output's")
    channels: int = Field(default=24, ge=8, description="base channel count of the first level")
    channel_mult: tuple[int, ...] = (1, 2, 2)  # channels * mult per level, highest resolution first
    num_res_blocks: int = Field(default=2, ge=1, description="per level (the decoder uses one more)")
    attention_levels: tuple[int, ...] = (2,)  # level indices with self-attention (2: 4x4 on 16x16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    num_classes: int = Field(default=0, ge=0, description="0: unconditional")
    noise_embedding: Literal["positional", "fourier"] = "positional"
    emb_mult: int = Field(default=4, ge=1, description="embedding width = channels * emb_mult (ADM: 4)")

    @model_validator(mode="after")
    def _levels(self) -> UNetConfig:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(
                f"channel_mult={list(self.channel_mult)} must hold one or more positive integers"
            )
        bad = [i for i in self.attention_levels if not 0 <= i < len(self.channel_mult)]
        if bad:
            raise ValueError(
                f"attention_levels {bad} out of range: channel_mult has levels 0..{len(self.channel_mult) - 1}"
            )
        return self

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


def noise_features(
    c_noise: torch.Tensor, dim: int, *, kind: str, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) real -> (B, dim) [cos, sin] features (EDM networks.py PositionalEmbedding / FourierFeatures)."""
    half = dim // 2
    if kind == "positional":
        freqs = (1 / 10_000) ** (torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    angles = c_noise.float()[:, None] * freqs[None, :].to(c_noise.device)  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class EmbResBlock(nn.Module):
    """Pre-activation residual block with AdaGN: the embedding scales and shifts the second norm."""

    def __init__(self, in_channels: int, out_channels: int, *, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = group_norm(in_channels), group_norm(out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (ADM)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> 2 x (B, C, 1, 1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class _Level(nn.Module):
    """The blocks of one resolution: residual blocks, each followed by attention where enabled."""

    def __init__(self, blocks: list[EmbResBlock], *, attention: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(
            AttnBlock(b.conv2.out_channels) if attention else nn.Identity() for b in blocks
        )


class UNet(nn.Module):
    """D(x; c_noise, label) -> (B, C, H, W), same shape as x."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        emb_dim = cfg.channels * cfg.emb_mult
        if cfg.noise_embedding == "fourier":  # fixed random frequencies (NCSN++ / EDM VE), not trained
            self.register_buffer("freqs", 2 * math.pi * 16 * torch.randn(cfg.channels // 2))
        else:
            self.freqs = None
        self.noise_mlp = nn.Sequential(
            nn.Linear(cfg.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.stem = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        # Encoder: every block's output is a skip for the decoder (the stem's too, as in ADM).
        self.down, self.downsample, skips, c = nn.ModuleList(), nn.ModuleList(), [cfg.channels], cfg.channels
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(EmbResBlock(c, w, emb_dim=emb_dim, dropout=cfg.dropout))
                c = w
                skips.append(c)
            self.down.append(_Level(blocks, attention=i in cfg.attention_levels))
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else Downsample(c))
            if not last:
                skips.append(c)
        self.mid1 = EmbResBlock(c, c, emb_dim=emb_dim, dropout=cfg.dropout)  # ADM's middle: res, attn, res
        self.mid_attn = AttnBlock(c)
        self.mid2 = EmbResBlock(c, c, emb_dim=emb_dim, dropout=cfg.dropout)
        # Decoder: one more block per level than the encoder, each eating one skip.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(EmbResBlock(c + skips.pop(), w, emb_dim=emb_dim, dropout=cfg.dropout))
                c = w
            self.up.append(_Level(blocks, attention=i in cfg.attention_levels))
            self.upsample.append(Upsample(c) if i > 0 else nn.Identity())
        self.out_norm = group_norm(c)
        self.out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(B,) noise levels and (B,) labels (None: the empty class) -> (B, emb_dim)."""
        cfg = self.config
        emb = self.noise_mlp(
            noise_features(c_noise, cfg.channels, kind=cfg.noise_embedding, freqs=self.freqs)
        )
        if self.label_emb is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional UNet (num_classes=0)")
            return emb
        if labels is None:
            labels = torch.full_like(c_noise, cfg.num_classes, dtype=torch.long)
        if labels.shape != c_noise.shape or labels.min() < 0 or labels.max() > cfg.num_classes:
            raise ValueError(
                f"labels must be (B,) = {tuple(c_noise.shape)} in [0, {cfg.num_classes}] "
                f"({cfg.num_classes} = no class), got shape {tuple(labels.shape)}"
            )
        return emb + self.label_emb(labels)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"UNet expects (B, {self.config.in_channels}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )
        c_noise = c_noise.reshape(-1).expand(x.shape[0]) if c_noise.numel() == 1 else c_noise
        if c_noise.shape != (x.shape[0],):
            raise ValueError(
                f"c_noise must be a scalar or (B,) = ({x.shape[0]},), got {tuple(c_noise.shape)}"
            )
        emb = self.embed(c_noise, labels)
        h = self.stem(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))  # (B, C + C_skip, h, w)
            h = up(h)
        return self.out(F.silu(self.out_norm(h)))
