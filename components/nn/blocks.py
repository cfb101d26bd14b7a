"""Convolutional building blocks of the VQGAN encoder/decoder (Esser et al. 2021, after DDPM's UNet).

Pre-activation residual blocks (GroupNorm -> SiLU -> conv, twice) as in Ho et al. 2020, strided-conv
downsampling, nearest-neighbour upsampling followed by a conv, and a single-head spatial
self-attention block used at the lowest resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 32  # Wu & He 2018 default; fewer when the channel count is not a multiple of 32


def group_norm(channels: int, *, max_groups: int = MAX_GROUPS) -> nn.GroupNorm:
    """GroupNorm whose group count divides `channels` (the largest divisor of both up to max_groups)."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 conv on the skip path when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (learned, unlike pooling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        # (B, C, h, w) -> (B, 1, h*w, C): one head over the spatial positions
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)
