"""Convolutional encoder/decoder of VQGAN (Esser et al. 2021, sec. 3; the VQ-VAE/DDPM-style CNN).

The encoder maps x (B, C, H, W) to z (B, z_channels, H/f, W/f) with f = 2**(len(channel_mult)-1):
one stride-2 downsampling between consecutive levels. The decoder mirrors it. A middle block
(ResBlock, optional self-attention, ResBlock) runs at the lowest resolution, where attention is cheap.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from components.nn.blocks import AttnBlock, Downsample, ResBlock, Upsample, group_norm
from components.schema import StrictConfig

DOWNSAMPLE_FACTORS = (2, 4, 8, 16)


class AutoencoderConfig(StrictConfig):
    """Encoder/decoder architecture; defaults are taming-transformers' ImageNet f=16 model."""

    in_channels: int = Field(default=3, ge=1, description="image channels (also the decoder's output)")
    channels: int = Field(default=128, ge=8, description="base channel count of the first level")
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # channels * mult per level, highest resolution first
    downsample_factor: int = 16  # f; must equal 2**(len(channel_mult)-1)
    num_res_blocks: int = Field(default=2, ge=1, description="per level (the decoder uses one more)")
    z_channels: int = Field(default=256, ge=1)
    attention: bool = True  # self-attention in the middle block at the lowest resolution
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent_factor(self) -> AutoencoderConfig:
        if self.downsample_factor not in DOWNSAMPLE_FACTORS:
            raise ValueError(
                f"downsample_factor={self.downsample_factor} is not one of {list(DOWNSAMPLE_FACTORS)}"
            )
        implied = 2 ** (len(self.channel_mult) - 1)
        if implied != self.downsample_factor:
            raise ValueError(
                f"channel_mult={list(self.channel_mult)} has {len(self.channel_mult)} levels, i.e. "
                f"f={implied}, but downsample_factor={self.downsample_factor}; use "
                f"{len(self.channel_mult)} levels for f={implied} or log2(f)+1 levels"
            )
        if any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult={list(self.channel_mult)} must hold positive integers")
        return self


def _middle(channels: int, *, attention: bool, dropout: float) -> nn.Sequential:
    attn = AttnBlock(channels) if attention else nn.Identity()
    return nn.Sequential(
        ResBlock(channels, channels, dropout=dropout), attn, ResBlock(channels, channels, dropout=dropout)
    )


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> z (B, z_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        c_in = widths[0]
        for level, c_out in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(c_in, c_out, dropout=config.dropout))
                c_in = c_out
            if level < len(widths) - 1:
                layers.append(Downsample(c_in))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(c_in, attention=config.attention, dropout=config.dropout)
        self.out = nn.Sequential(
            group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, config.z_channels, 3, padding=1)
        )
        self.downsample_factor = config.downsample_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by downsample_factor={f}")
        return self.out(self.mid(self.down(self.conv_in(x))))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x (B, in_channels, h*f, w*f); `last_layer` is the output conv weight."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, c_in, 3, padding=1)
        self.mid = _middle(c_in, attention=config.attention, dropout=config.dropout)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            # one more block than the encoder, as in taming-transformers
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResBlock(c_in, widths[level], dropout=config.dropout))
                c_in = widths[level]
            if level > 0:
                layers.append(Upsample(c_in))
        self.up = nn.Sequential(*layers)
        self.norm_out = nn.Sequential(group_norm(c_in), nn.SiLU())
        self.conv_out = nn.Conv2d(c_in, config.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv: the adaptive GAN weight compares gradients here (eq. 7)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.norm_out(self.up(self.mid(self.conv_in(z)))))
