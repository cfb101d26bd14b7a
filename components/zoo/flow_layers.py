"""Glow's layers (Kingma & Dhariwal 2018): squeeze, actnorm, invertible 1x1 conv, affine coupling, the
multi-scale split prior and the per-class affine; each returns its output and log|det| per sample.
The flow that stacks them, its likelihood and sampling are in flow.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from components.training import distributed as dist

LOG_2PI = math.log(2 * math.pi)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes four channels."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `squeeze`."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(log_std)^2) summed per sample, (B,)."""
    lp = -0.5 * (LOG_2PI + 2 * log_std + (z - mean).pow(2) * torch.exp(-2 * log_std))
    return lp.flatten(1).sum(1)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + b) exp(s), initialised from the first training batch (Glow 3.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        # Moments averaged over DDP ranks: every rank must start from the same parameters.
        mean = dist.all_reduce_mean(x.mean(dim=(0, 2, 3)))
        sq = dist.all_reduce_mean(x.pow(2).mean(dim=(0, 2, 3)))
        std = (sq - mean.pow(2)).clamp_min(0).sqrt()
        self.bias.copy_(-mean.view_as(self.bias))
        self.log_scale.copy_(-torch.log(std + 1e-6).view_as(self.log_scale))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self._init(x)
        logdet = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return (x + self.bias) * torch.exp(self.log_scale), logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class ClassAffine(nn.Module):
    """y = (x + b_y) exp(s_y) per class y and per sub-pixel (C, H, W): log|det| = sum s_y.

    A conditional actnorm at full resolution: b_y starts at minus the class-mean image of the first
    training batch (rows without samples there, and the "no label" row, at minus the batch mean), s_y
    at 0. The flow then only models each class's deviation from its mean, so low-temperature samples
    carry the class from the first steps on (the couplings' and priors' class biases learn slowly).
    """

    def __init__(self, shape: tuple[int, int, int], *, rows: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(max(rows, 1), *shape))
        self.log_scale = nn.Parameter(torch.zeros(max(rows, 1), *shape))
        self.register_buffer("initialized", torch.tensor(False))

    def _rows(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return y if y is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    @torch.no_grad()
    def _init(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        # Per-row sums and counts summed over DDP ranks: every rank starts from the same parameters.
        onehot = nn.functional.one_hot(rows, self.bias.shape[0]).to(x.dtype)  # (B, R)
        sums = dist.all_reduce_sum(torch.einsum("br,bchw->rchw", onehot, x))
        counts = dist.all_reduce_sum(onehot.sum(0))
        overall = sums.sum(0) / counts.sum().clamp_min(1)
        means = torch.where(
            (counts > 0)[:, None, None, None], sums / counts.clamp_min(1)[:, None, None, None], overall
        )
        self.bias.copy_(-means)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(x, y)
        if self.training and not bool(self.initialized):
            self._init(x, rows)
        log_scale = self.log_scale[rows]
        return (x + self.bias[rows]) * torch.exp(log_scale), log_scale.flatten(1).sum(1)

    def inverse(self, y_: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        rows = self._rows(y_, y)
        return y_ * torch.exp(-self.log_scale[rows]) - self.bias[rows]


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution in LU form, initialised with a random rotation (Glow 3.2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.lower.shape[0], device=self.lower.device, dtype=self.lower.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.shape[2] * x.shape[3] * self.log_s.sum()
        return nn.functional.conv2d(x, self.weight()[:, :, None, None]), logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(y, torch.linalg.inv(self.weight())[:, :, None, None])


class Coupling(nn.Module):
    """Affine coupling: x_b -> (x_b + t) * sigmoid(s + 2) with (s, t) from x_a and the class."""

    def __init__(self, channels: int, *, hidden: int, rows: int) -> None:
        super().__init__()
        self.split = channels // 2
        out = channels - self.split
        self.conv_in = nn.Conv2d(self.split, hidden, 3, padding=1)
        self.embed = nn.Embedding(rows, hidden) if rows else None
        self.mid = nn.Conv2d(hidden, hidden, 1)
        self.conv_out = nn.Conv2d(hidden, 2 * out, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # Glow: every coupling starts near the identity
        nn.init.zeros_(self.conv_out.bias)
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    def _params(self, x_a: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(x_a)
        if self.embed is not None:
            h = h + self.embed(y)[:, :, None, None]
        shift, s = self.conv_out(torch.relu(self.mid(torch.relu(h)))).chunk(2, dim=1)
        return shift, torch.sigmoid(s + 2.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, scale = self._params(x_a, y)
        return torch.cat([x_a, (x_b + shift) * scale], dim=1), torch.log(scale).flatten(1).sum(1)

    def inverse(self, y_: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y_a, y_b = y_[:, : self.split], y_[:, self.split :]
        shift, scale = self._params(y_a, y)
        return torch.cat([y_a, y_b / scale - shift], dim=1)


class FlowStep(nn.Module):
    """actnorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, channels: int, *, hidden: int, rows: int) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = Coupling(channels, hidden=hidden, rows=rows)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld_a = self.actnorm(x)
        x, ld_w = self.invconv(x)
        x, ld_c = self.coupling(x, y)
        return x, ld_a + ld_w + ld_c

    def inverse(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(x, y)))


class SplitPrior(nn.Module):
    """(mean, log_std) of a factored-out half from the kept half and the class; N(0, I) at init."""

    def __init__(self, kept: int, out: int, *, rows: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(kept, 2 * out, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.embed = nn.Embedding(max(rows, 1), 2 * out)
        nn.init.zeros_(self.embed.weight)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = y if y is not None else torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        return (self.conv(h) + self.embed(rows)[:, :, None, None]).chunk(2, dim=1)
