"""Bits/dim conversions and the discretized Gaussian, on distributions with known entropy."""

from __future__ import annotations

import math

import pytest
import torch

from components.evaluation.likelihood import (
    BIN_WIDTH,
    bits_per_dim,
    dequantize,
    dequantized_bits_per_dim,
    discretized_gaussian_log_likelihood,
    to_levels,
)

D = 16 * 16  # one 16x16 grey image


def test_uniform_discrete_distribution_is_eight_bits() -> None:
    nll = D * math.log(256)  # P(x_int) = 256^-D
    assert bits_per_dim(nll, num_dims=D) == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor([nll, nll / 2]), num_dims=D).tolist() == pytest.approx([8.0, 4.0])


def test_uniform_density_on_minus_one_one_is_eight_bits() -> None:
    nll = D * math.log(2)  # p(x) = 2^-D on [-1, 1]^D
    assert dequantized_bits_per_dim(nll, num_dims=D) == pytest.approx(8.0)
    assert dequantized_bits_per_dim(nll, num_dims=D) == pytest.approx(
        (nll + D * math.log(128)) / (D * math.log(2))
    )
    assert dequantized_bits_per_dim(0.0, num_dims=D, bin_width=1 / 256) == pytest.approx(8.0)  # [0, 1] data


def test_dequantize_stays_in_the_pixels_bin() -> None:
    levels = torch.arange(256).float()
    x = levels / 127.5 - 1  # the prepared-data grid
    assert torch.equal(to_levels(x), levels.long())
    g = torch.Generator().manual_seed(0)
    z = dequantize(x.repeat(50), generator=g)
    lo = levels.repeat(50) * BIN_WIDTH - 1
    assert (z >= lo).all() and (z < lo + BIN_WIDTH).all()
    assert z.min() >= -1 and z.max() < 1


@pytest.mark.parametrize(
    ("mean", "log_scale"), [(0.0, math.log(0.3)), (0.9, math.log(0.01)), (-1.0, math.log(2.0))]
)
def test_discretized_gaussian_sums_to_one_over_levels(mean: float, log_scale: float) -> None:
    x = torch.arange(256).double() / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(
        x, mean=torch.full_like(x, mean), log_scale=torch.full_like(x, log_scale)
    )
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_matches_density_times_bin_for_a_wide_gaussian() -> None:
    x, sigma = torch.tensor([0.0039215686, 0.5]), 0.5
    logp = discretized_gaussian_log_likelihood(
        x, mean=torch.zeros(2), log_scale=torch.full((2,), math.log(sigma))
    )
    density = torch.distributions.Normal(0.0, sigma).log_prob(x).double() + math.log(2 / 255)
    torch.testing.assert_close(logp, density, rtol=0, atol=1e-4)
