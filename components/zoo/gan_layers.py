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


#: DiffAugment's transforms (Zhao et al. 2020, sec. 3), applied in this order.
AUGMENTS = ("color", "translation", "cutout")


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Differentiable augmentation of images in [-1, 1], drawn per sample (Zhao et al. 2020).

    "color": brightness + U(-0.5, 0.5), saturation x U(0, 2) about the pixel's channel mean, contrast
    x U(0.5, 1.5) about the image mean; "translation": an integer shift of up to 1/8 of each side,
    vacated pixels 0; "cutout": a square of half each side set to 0 at a uniform centre (clipped at
    the border). The same transforms are applied to reals and fakes before the discriminator, in both
    phases, so D never sees an un-augmented image and G's gradient flows through the transform: a
    small data set no longer lets D memorise its images (the paper's fix for data-limited GANs).
    """
    unknown = sorted(set(policy) - set(AUGMENTS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; valid: {list(AUGMENTS)}")
    for name in AUGMENTS:
        if name in policy:
            x = _TRANSFORMS[name](x)
    return x


def _uniform(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)


def _color(x: torch.Tensor) -> torch.Tensor:
    x = x + _uniform(x, -0.5, 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _uniform(x, 0.0, 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def _translation(x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    py, px = h // 8, w // 8
    if not (py or px):
        return x
    shift_y = torch.randint(-py, py + 1, (b, 1), device=x.device)
    shift_x = torch.randint(-px, px + 1, (b, 1), device=x.device)
    rows = torch.arange(h, device=x.device) + py - shift_y  # (B, H): padded-map row each output row reads
    cols = torch.arange(w, device=x.device) + px - shift_x
    padded = nn.functional.pad(x, (px, px, py, py))
    index = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    sy, sx = max(h // 2, 1), max(w // 2, 1)
    top = torch.randint(0, h, (b, 1, 1), device=x.device) - sy // 2  # the centre is uniform over the image
    left = torch.randint(0, w, (b, 1, 1), device=x.device) - sx // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= top) & (ys < top + sy) & (xs >= left) & (xs < left + sx)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_TRANSFORMS = {"color": _color, "translation": _translation, "cutout": _cutout}
