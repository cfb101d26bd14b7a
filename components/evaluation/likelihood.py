"""Bits per dimension for 8-bit images, from discrete and from continuous (dequantized) likelihoods.

Discrete models (PixelCNN, a discretized decoder) give -log P(x_int) in nats directly:
    bpd = -log P(x_int) / (D log 2).

Continuous models (flows, Theis et al. 2016; Dinh et al. 2017; Kingma & Dhariwal 2018) see the
integers x_int in {0..255}^D dequantized into bins of width Delta: x = lo + (x_int + u) Delta,
u ~ U[0, 1)^D. Since P(x_int) = int_bin p(x) dx and log is concave (Jensen),
    -log P(x_int) <= E_u[-log p(x)] - D log Delta,
    bpd = (nll - D log Delta) / (D log 2),   nll = -log p(x) in nats, summed over the D dims.
On [-1, 1] with 256 levels, Delta = 2/256 = 1/128, so bpd = (nll + D log 128) / (D log 2): the
uniform density 2^-D on [-1, 1]^D has nll = D log 2 and bpd = 1 + 7 = 8 bits, as it must.
`dequantize` produces exactly these bins from the project's grid x = x_int / 127.5 - 1.
"""

from __future__ import annotations

import math

import torch

LEVELS = 256
BIN_WIDTH = 2.0 / LEVELS  # Delta for 256 levels dequantized over [-1, 1)


def bits_per_dim(nll: torch.Tensor | float, *, num_dims: int) -> torch.Tensor | float:
    """Discrete NLL in nats over `num_dims` dimensions -> bits/dim."""
    if num_dims <= 0:
        raise ValueError(f"num_dims={num_dims} must be positive")
    return nll / (num_dims * math.log(2))


def dequantized_bits_per_dim(
    nll: torch.Tensor | float, *, num_dims: int, bin_width: float = BIN_WIDTH
) -> torch.Tensor | float:
    """Continuous NLL in nats of dequantized data -> bits/dim: (nll - D log Delta) / (D log 2)."""
    if bin_width <= 0:
        raise ValueError(f"bin_width={bin_width} must be positive")
    return bits_per_dim(nll - num_dims * math.log(bin_width), num_dims=num_dims)


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Integer levels x_int (int64, 0..255) of images on the grid x = x_int / 127.5 - 1."""
    return ((x.clamp(-1, 1) + 1) * (LEVELS - 1) / 2).round().long()


def dequantize(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization: (x_int + u) * Delta - 1 in [-1, 1), u ~ U[0, 1), Delta = 1/128."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (to_levels(x).to(x.dtype) + u) * BIN_WIDTH - 1


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) per element for x on the 256-level grid in [-1, 1] (Ho et al. 2020, eq. 13).

    Bins are x +- 1/255; the outermost bins extend to -inf and +inf so the 256 masses sum to one.
    """
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    half = 1.0 / (LEVELS - 1)
    inv_s = torch.exp(-log_scale)
    upper = (x + half - mean) * inv_s
    lower = (x - half - mean) * inv_s
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Phi(upper), for the bottom bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log (1 - Phi(lower)), for the top bin
    mid = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_mid = torch.log(mid.clamp(min=1e-12))  # as in the DDPM reference code
    return torch.where(x < -1 + half, log_cdf_upper, torch.where(x > 1 - half, log_sf_lower, log_mid))
