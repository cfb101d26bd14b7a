"""Noise schedules and time discretizations, all as sigma grids in EDM's sigma space.

- DDPM's discrete table (Ho et al. 2020, eq. 4; cosine: Nichol & Dhariwal 2021, eq. 17):
  alpha_bar_t = prod_{s<=t} (1 - beta_s), sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), t = 0..T-1.
- Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
- The objective's own timesteps with the spacings of Lin et al. 2024 ("Common Diffusion Noise
  Schedules and Sample Steps are Flawed", Table 2): leading, trailing, linspace.
- Flow matching: t on a uniform grid from T_MAX to 0, sigma = t / (1 - t).
Every grid is descending and ends with sigma = 0 (the last step returns the denoised estimate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from components.diffusion.config import DiffusionConfig, SamplingConfig

#: EDM Table 1's sampling range, used by every objective unless its own range is narrower.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0
#: Flow's t = 1 is sigma = inf; sampling starts at t = 1 - 1e-3 (rectified flow's eps), where the
#: data still makes up 0.1% of x_t.
FLOW_T_MAX = 1.0 - 1e-3


def ddpm_sigmas(*, beta_schedule: str, num_timesteps: int) -> torch.Tensor:
    """(T,) float64 ascending sigma_t of DDPM's discrete chain."""
    T = num_timesteps
    if beta_schedule == "linear":
        scale = 1000 / T  # iDDPM's rescaling keeps the endpoints of Ho et al.'s T = 1000 schedule
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    elif beta_schedule == "cosine":
        s = 0.008  # iDDPM's offset: beta_1 is not too small near t = 0
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # iDDPM clips beta to avoid a singular t = T
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: linear, cosine")
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def karras_sigmas(steps: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(steps + 1,) EDM eq. 5 followed by sigma_N = 0."""
    ramp = (
        torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    )
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def timestep_indices(steps: int, *, num_timesteps: int, spacing: str) -> torch.Tensor:
    """(steps,) int64 descending DDPM timesteps in [0, T-1] (Lin et al. 2024, Table 2)."""
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps={steps} must lie in [1, num_timesteps={T}]")
    if spacing == "leading":  # never reaches t = T-1: the flaw that paper points out
        t = torch.arange(steps, dtype=torch.float64) * (T // steps)
    elif spacing == "trailing":
        t = torch.arange(T, 0, -T / steps, dtype=torch.float64).flip(0) - 1
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: leading, trailing, linspace")
    return t.round().long().flip(0)


def flow_sigmas(steps: int, *, t_max: float = FLOW_T_MAX) -> torch.Tensor:
    """(steps + 1,) sigma = t / (1 - t) for t uniform from t_max down to 0."""
    t = torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)
    return t / (1 - t)


def sigma_bounds(model: DiffusionConfig) -> tuple[float, float]:
    """Noise levels the objective can be evaluated at: DDPM its table's span, others (0, inf)."""
    if model.objective == "ddpm":
        table = ddpm_sigmas(beta_schedule=model.beta_schedule, num_timesteps=model.num_timesteps)
        return float(table[0]), float(table[-1])
    return 0.0, math.inf


def default_sigma_range(model: DiffusionConfig) -> tuple[float, float]:
    """Karras' (sigma_min, sigma_max) when SamplingConfig leaves them null."""
    if model.objective == "ve":
        return model.sigma_min, model.sigma_max  # EDM's VE column samples over its training range
    lo, hi = sigma_bounds(model)
    return max(EDM_SIGMA_MIN, lo), min(EDM_SIGMA_MAX, hi)


def sampling_sigmas(
    model: DiffusionConfig, sampling: SamplingConfig, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(steps + 1,) float32 descending sigmas, ending at 0, for a pair `config.check_sampling` passed."""
    disc, steps = sampling.discretization, sampling.steps
    if disc == "karras":
        lo, hi = default_sigma_range(model)
        lo = sampling.sigma_min if sampling.sigma_min is not None else lo
        hi = sampling.sigma_max if sampling.sigma_max is not None else hi
        sigmas = karras_sigmas(steps, sigma_min=lo, sigma_max=hi, rho=sampling.rho)
    elif model.objective == "flow":
        sigmas = flow_sigmas(steps)
    else:
        table = ddpm_sigmas(beta_schedule=model.beta_schedule, num_timesteps=model.num_timesteps)
        t = timestep_indices(steps, num_timesteps=model.num_timesteps, spacing=disc)
        sigmas = torch.cat([table[t], table.new_zeros(1)])
    return sigmas.to(device=device, dtype=torch.float32)
