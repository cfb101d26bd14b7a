"""Preconditioners: each objective as EDM's denoiser (Karras et al. 2022, eq. 7 and Table 1).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), class),

with x = x0 + sigma n in EDM's sigma space (the objective's own x_t divided by its scale s(t)).
Each class keeps to its four coefficients (EDM `networks.py` style) plus what a sampler needs:
the scale s(sigma), the map between the objective's time t and sigma, and a default sigma range.
- ddpm (VP, Ho et al. 2020): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, so s = 1/sqrt(1 + sigma^2);
  eps-prediction D = x - sigma F; v-prediction (Salimans & Ho 2022, v = sqrt(abar) eps -
  sqrt(1 - abar) x0) D = x/(1 + sigma^2) - sigma/sqrt(1 + sigma^2) F. c_noise is the (fractional)
  timestep t in [0, T-1], log-sigma interpolated in the discrete table (k-diffusion DiscreteSchedule).
- ve (Song et al. 2021): D = x + sigma F(x; ln(sigma/2)).
- edm: c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2), c_in = 1/sqrt(sigma^2 + sd^2),
  c_noise = ln(sigma)/4.
- flow (Lipman et al. 2023, Liu et al. 2023): x_t = (1 - t) x0 + t eps, F predicts v = eps - x0, so
  sigma = t/(1 - t), s = 1 - t = 1/(1 + sigma) and D = s x - t F(s x; 1000 t).
"""

from __future__ import annotations

import torch
from torch import nn

from components.diffusion.config import DiffusionConfig
from components.diffusion.discretization import ddpm_sigmas, default_sigma_range, sigma_bounds
from components.nn.unet import UNet

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Preconditioner(nn.Module):
    """D(x; sigma, labels) around a backbone F; subclasses define `coefficients` and the time map."""

    def __init__(self, net: nn.Module, *, config: DiffusionConfig) -> None:
        super().__init__()
        self.net, self.config = net, config
        self.sigma_min, self.sigma_max = default_sigma_range(config)  # karras defaults for sampling
        self.sigma_lo, self.sigma_hi = sigma_bounds(config)  # where D may be evaluated at all

    @property
    def num_classes(self) -> int:
        """Class count of the backbone; label == num_classes is the empty class (CFG)."""
        return self.net.config.num_classes

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        """(c_skip, c_out, c_in, c_noise), each shaped like `sigma`."""
        raise NotImplementedError

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s(sigma): the objective's x_t = s (x0 + sigma n)."""
        return torch.ones_like(sigma)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The objective's time for a noise level (ve and edm: t = sigma, EDM's choice)."""
        return sigma

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W) at noise level sigma (scalar or (B,)) -> D(x; sigma) (B, C, H, W)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        F_x = self.net((c_in * x).to(x.dtype), c_noise.reshape(-1), labels)
        return (c_skip * x + c_out * F_x.to(torch.float32)).to(x.dtype)


class DDPMPrecond(Preconditioner):
    """VP / DDPM on its discrete timesteps, eps- or v-prediction."""

    def __init__(self, net: nn.Module, *, config: DiffusionConfig) -> None:
        super().__init__(net, config=config)
        table = ddpm_sigmas(beta_schedule=config.beta_schedule, num_timesteps=config.num_timesteps)
        # Not persistent: rebuilt from the config, so exports hold weights only.
        self.register_buffer("sigmas", table.float(), persistent=False)
        # log of the float32 table, so that sigma_to_t is exact on table entries
        self.register_buffer("log_sigmas", table.float().log(), persistent=False)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_in = 1 / (sigma**2 + 1).sqrt()
        if self.config.prediction == "eps":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        else:
            c_skip, c_out = 1 / (sigma**2 + 1), -sigma * c_in
        return c_skip, c_out, c_in, self.sigma_to_t(sigma)

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + 1).sqrt()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep: linear in log sigma between table entries, exact on them."""
        log_sigma = sigma.clamp(min=self.sigmas[0], max=self.sigmas[-1]).log()
        lo = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, len(self.sigmas) - 2)
        left, right = self.log_sigmas[lo], self.log_sigmas[lo + 1]
        frac = ((log_sigma - left) / (right - left)).clamp(0, 1)
        return lo.to(sigma.dtype) + frac

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.sigmas) - 2)
        frac = t - lo
        return ((1 - frac) * self.log_sigmas[lo] + frac * self.log_sigmas[lo + 1]).exp()


class VEPrecond(Preconditioner):
    """Variance exploding (EDM Table 1, VE column)."""

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class EDMPrecond(Preconditioner):
    """EDM's own preconditioning (Table 1, "ours")."""

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd = self.config.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class FlowPrecond(Preconditioner):
    """Flow matching / rectified flow with velocity prediction, in the denoiser form."""

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        s = 1 / (1 + sigma)  # = 1 - t
        t = sigma * s
        # c_noise = 1000 t: the UNet's positional features resolve the [0, 1000) range DDPM uses.
        return s, -t, s, 1000 * t

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + sigma)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma / (1 + sigma)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t / (1 - t)


#: objective name -> preconditioner class.
PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    "ddpm": DDPMPrecond,
    "ve": VEPrecond,
    "edm": EDMPrecond,
    "flow": FlowPrecond,
}


def build_denoiser(config: DiffusionConfig, *, net: nn.Module | None = None) -> Preconditioner:
    """The objective's preconditioner around `net` (default: a UNet from `config.backbone`)."""
    if config.objective not in PRECONDITIONERS:
        raise ValueError(
            f"unknown objective {config.objective!r}; valid: {', '.join(sorted(PRECONDITIONERS))}"
        )
    net = UNet(config.backbone) if net is None else net
    return PRECONDITIONERS[config.objective](net, config=config)
