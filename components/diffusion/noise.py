"""Training noise levels p(sigma) and loss weights lambda(sigma) per objective (EDM Table 1, eq. 8).

- ddpm: t ~ U{0, .., T-1}, sigma = sigma_t of the discrete table (Ho et al. 2020, Algorithm 1).
- ve:   sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1) (log-uniform, EDM's VE column).
- edm:  ln sigma ~ N(P_mean, P_std^2).
- flow: t ~ U(eps, 1) (rectified flow) or t = sigmoid(m + s z), z ~ N(0, 1) (logit-normal, Esser et al.
  2024, eq. 19); sigma = t / (1 - t), so logit-normal t is log-normal sigma.
lambda(sigma) = 1 / c_out(sigma)^2 for every objective: then lambda ||D - x0||^2 = ||F - F_target||^2,
the paper's loss in its own parameterisation (eps-MSE, v-MSE, velocity MSE, EDM's weighted loss).
Draws use `generator` if given, else the global RNG (which the training loop seeds and checkpoints).
"""

from __future__ import annotations

import torch

from components.diffusion.config import DiffusionConfig
from components.diffusion.discretization import ddpm_sigmas

FLOW_T_MIN = 1e-5  # rectified flow draws t from [eps, 1) too (its eps is 1e-3)


def sample_sigma(
    n: int,
    *,
    config: DiffusionConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n,) float32 training noise levels drawn from the objective's p(sigma)."""
    kw = {"generator": generator, "device": device}
    objective = config.objective
    if objective == "ddpm":
        table = ddpm_sigmas(beta_schedule=config.beta_schedule, num_timesteps=config.num_timesteps)
        t = torch.randint(0, config.num_timesteps, (n,), **kw)
        return table.to(device)[t].float()
    if objective == "ve":
        u = torch.rand(n, **kw)
        lo, hi = torch.tensor(config.sigma_min).log(), torch.tensor(config.sigma_max).log()
        return (lo + u * (hi - lo)).exp()
    if objective == "edm":
        return (config.p_mean + config.p_std * torch.randn(n, **kw)).exp()
    if objective == "flow":
        if config.t_distribution == "uniform":
            # t in [FLOW_T_MIN, 1): t = 0 would give lambda = inf times a zero error (NaN)
            t = FLOW_T_MIN + (1 - FLOW_T_MIN) * torch.rand(n, **kw)
            return t / (1 - t)
        return (config.t_mean + config.t_std * torch.randn(n, **kw)).exp()  # logit(t) ~ N(m, s^2)
    raise ValueError(f"unknown objective {objective!r}; valid: ddpm, ve, edm, flow")


def loss_weight(sigma: torch.Tensor, *, config: DiffusionConfig) -> torch.Tensor:
    """lambda(sigma) = 1 / c_out(sigma)^2, shaped like `sigma`."""
    objective = config.objective
    if objective == "ddpm":
        if config.prediction == "eps":
            return 1 / sigma**2  # c_out = -sigma
        return (1 + sigma**2) / sigma**2  # v: c_out = -sigma / sqrt(1 + sigma^2)
    if objective == "ve":
        return 1 / sigma**2
    if objective == "edm":
        sd = config.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2
    if objective == "flow":
        return ((1 + sigma) / sigma) ** 2  # 1 / t^2
    raise ValueError(f"unknown objective {objective!r}; valid: ddpm, ve, edm, flow")
