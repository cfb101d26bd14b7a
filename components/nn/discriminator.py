"""PatchGAN discriminator (Isola et al. 2017, pix2pix; as used by VQGAN, Esser et al. 2021).

A stack of 4x4 convs whose output is a grid of logits, one per overlapping image patch. Normalisation
is GroupNorm, not the original BatchNorm: GroupNorm is per sample, so the discriminator computes the
same function on every DDP rank whatever the per-worker batch, real and fake images can share one
forward pass without leaking batch statistics between them, there are no running statistics for DDP
to broadcast from rank 0, and train and eval modes agree.
"""

from __future__ import annotations

import torch
from torch import nn

from components.nn.blocks import group_norm

MAX_CHANNEL_MULT = 8  # channel growth stops at 8x base, as in pix2pix


class PatchDiscriminator(nn.Module):
    """x (B, C, H, W) -> patch logits (B, 1, H/2**n_layers - 2, W/2**n_layers - 2)."""

    def __init__(self, *, in_channels: int, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers={n_layers} must be >= 1")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        c_in = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2**n, MAX_CHANNEL_MULT)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                group_norm(c_out),
                nn.LeakyReLU(0.2),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.apply(_init_weights)

    def min_size(self) -> int:
        """Smallest image side that leaves at least one patch logit."""
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size():
            raise ValueError(
                f"discriminator with layers={self.n_layers} needs images of at least {self.min_size()} px, "
                f"got {tuple(x.shape[-2:])}; lower loss.disc.layers"
            )
        return self.net(x)


def _init_weights(m: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016), as in pix2pix."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
