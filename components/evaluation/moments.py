"""Per-channel mean and standard deviation in one streaming pass (Chan, Golub and LeVeque 1979).

Each batch's count, mean and sum of squared deviations merge exactly into the running ones:

    n = n_a + n_b,   mu = mu_a + delta n_b / n,   M2 = M2_a + M2_b + delta^2 n_a n_b / n

in float64, so the result equals the one-shot statistics to rounding whatever the batch sizes, and
no more than one batch is ever held. Latent diffusion standardises its latents with these.
"""

from __future__ import annotations

import torch


class ChannelMoments:
    """Running per-channel count, mean and M2 of tensors (B, C, ...) reduced over every axis but C."""

    def __init__(self, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"channels={channels} must be >= 1")
        self.channels = channels
        self.n = 0  # values per channel so far
        self.mu = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch (B, C, ...)."""
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected a batch (B, {self.channels}, ...), got {tuple(x.shape)}")
        v = x.detach().to("cpu", torch.float64).transpose(0, 1).reshape(self.channels, -1)  # (C, values)
        n_b = v.shape[1]
        if n_b == 0:
            return
        if not torch.isfinite(v).all():
            raise FloatingPointError(f"batch of shape {tuple(x.shape)} holds NaN or Inf values")
        mu_b = v.mean(dim=1)
        m2_b = (v - mu_b[:, None]).square().sum(dim=1)
        n = self.n + n_b
        delta = mu_b - self.mu
        self.mu = self.mu + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * n_b / n)
        self.n = n

    def mean(self) -> torch.Tensor:
        """Per-channel mean (C,) float64."""
        if self.n == 0:
            raise ValueError("no values: the mean of an empty set is undefined")
        return self.mu.clone()

    def std(self) -> torch.Tensor:
        """Per-channel unbiased standard deviation (C,) float64 (torch.std's default correction)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 values per channel for a standard deviation, got {self.n}")
        return (self.m2 / (self.n - 1)).sqrt()
