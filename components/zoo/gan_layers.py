"""The GAN's small parts: conditional BatchNorm and minibatch std (the losses: adversarial.py)."""

from __future__ import annotations

import math

import torch
from torch import nn


class CondBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are looked up per class (de Vries et al. 2017); plain if K = 0."""

    def __init__(self, channels: int, *, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=num_classes == 0)
        self.gain = self.bias = None
        if num_classes:
            self.gain, self.bias = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
            nn.init.normal_(self.gain.weight, 1.0, 0.02)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.bn(x)
        if self.gain is None:
            return h
        return h * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


def minibatch_std(phi: torch.Tensor, *, group: int, parts: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): each sample's group std, averaged over (C, H, W) (Karras et al. 2018).

    Groups are runs of gcd(B / parts, group) consecutive samples, so none straddles two of the `parts`
    (real and fake judged in one forward); a collapsed generator's groups have a telltale low value.
    """
    b = phi.shape[0]
    if parts < 1 or b % parts:
        raise ValueError(f"batch of {b} does not split into parts={parts} equal batches")
    g = math.gcd(b // parts, group)
    grouped = phi.view(b // g, g, *phi.shape[1:])  # (B/g, g, C, H, W)
    std = (grouped.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
    return std.repeat_interleave(g).view(b, 1, 1, 1).expand(b, 1, *phi.shape[2:])
