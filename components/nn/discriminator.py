"""PatchGAN discriminator (Isola et al. 2017, pix2pix; as used by VQGAN, Esser et al. 2021).

A stack of 4x4 convs whose output is a grid of logits, one per overlapping image patch. pix2pix and
taming-transformers normalise with BatchNorm; here the default is no normalisation at all (as in
StyleGAN's discriminator, Karras et al. 2019), and `norm="group"` keeps the per-sample GroupNorm this
module used before. Neither has batch statistics, so the discriminator computes the same function
on every DDP rank whatever the per-worker batch, real and fake images share one forward pass without
leaking statistics between them, and train and eval modes agree.

Why not GroupNorm: on this project's small images the hidden maps are 4x4 and 3x3, and a large part
of each map is the same for every image (the zero padding around a -1 background, the biases).
GroupNorm divides each sample by the spread of its group, input-independent part included, so the
discriminator can drown the image-dependent part by growing the constant one. Under the VQGAN game
it did: the logits stopped depending on the input (std over images 0.27 -> 0.004), the hinge loss
sat at 1.000 with a vanishing gradient, and the generator's adversarial term became noise
(BENCHMARKS.md, "VQGAN discriminator"). Without a normalisation nothing divides the input signal.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from components.nn.blocks import group_norm

MAX_CHANNEL_MULT = 8  # channel growth stops at 8x base, as in pix2pix
LEAKY_SLOPE = 0.2  # pix2pix, DCGAN
Norm = Literal["none", "group"]
NORMS: tuple[str, ...] = ("none", "group")


class PatchDiscriminator(nn.Module):
    """x (B, C, H, W) -> patch logits (B, 1, H/2**n_layers - 2, W/2**n_layers - 2)."""

    def __init__(
        self, *, in_channels: int, channels: int = 64, n_layers: int = 3, norm: Norm = "none"
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers={n_layers} must be >= 1")
        if norm not in NORMS:
            raise ValueError(f"unknown discriminator norm {norm!r}; valid: {list(NORMS)}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
        ]
        c_in = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2**n, MAX_CHANNEL_MULT)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            grouped = norm == "group"
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=not grouped),
                group_norm(c_out) if grouped else nn.Identity(),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.norm = norm
        self.apply(_init_dcgan if norm == "group" else _init_he)

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


def _init_he(m: nn.Module) -> None:
    """He initialisation for leaky ReLU (He et al. 2015): without a norm, N(0, 0.02) would shrink
    the signal ~10x per layer and leave the biases, which Adam moves by ~lr per step, in charge."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _init_dcgan(m: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016), as in pix2pix: the scale is the norm layers' job."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
