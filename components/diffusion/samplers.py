"""Samplers as pure functions in EDM's sigma space (Karras et al. 2022; k-diffusion `sampling.py`).

Each takes (denoiser, x at sigmas[0], sigmas descending to 0) and returns x0; randomness comes only
from `generator`. With x = x0 + sigma n and the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma
(EDM eq. 3 with s = 1, sigma(t) = t):
- euler: x' = x + (sigma' - sigma) d, d = (x - D)/sigma (EDM Algorithm 1 without the Heun correction).
- heun: EDM Algorithm 2: optional churn (raise sigma to sigma_hat, add noise), Euler, trapezoidal
  correction except on the last step to sigma = 0.
- ddim (Song et al. 2021, eq. 12) rewritten in sigma space: x' = D + sqrt(sigma'^2 - sigma_up^2) eps_hat
  + sigma_up z, eps_hat = (x - D)/sigma, sigma_up = eta sigma' sqrt(1 - sigma'^2/sigma^2). At eta = 0
  this is Euler (DDIM is the Euler solver of the same ODE); it holds for any path x_t = s (x0 + sigma n),
  so also for flow matching (Euler in t).
- ddpm: ancestral sampling (Ho et al. 2020, Algorithm 2) with the posterior variance beta_tilde; on
  any subset of the timesteps it equals ddim at eta = 1.
Classifier-free guidance (Ho & Salimans 2022): D = D_u + w (D_c - D_u), both from one forward of 2B.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from components.diffusion.config import DiffusionConfig, SamplingConfig, check_sampling
from components.diffusion.discretization import sampling_sigmas

Denoiser = Callable[..., torch.Tensor]  # D(x, sigma (B,), labels) -> (B, ...)


Guidance = float | Callable[[torch.Tensor], float]  # a weight, or the weight at a noise level


def guidance_in_interval(
    guidance: float, *, sigma_lo: float, sigma_hi: float
) -> Callable[[torch.Tensor], float]:
    """w at noise levels in (sigma_lo, sigma_hi], 1 (no guidance) elsewhere (Kynkaanniemi et al. 2024).

    Guidance at high noise pulls samples towards the class mode early and costs diversity; at low
    noise it changes little. Limiting it to the middle levels improves FID and skips the extra
    unconditional forward at every other step.
    """
    return lambda sigma: guidance if sigma_lo < float(sigma.reshape(-1)[0]) <= sigma_hi else 1.0


def guided(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    guidance: Guidance,
) -> torch.Tensor:
    """D(x; sigma) with classifier-free guidance; w = 1 (or no labels) is one plain conditional call."""
    sigma = sigma.reshape(1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
    if callable(guidance):
        guidance = guidance(sigma)
    if guidance == 1.0 or labels is None:
        return denoiser(x, sigma, labels)
    empty = torch.full_like(labels, denoiser.num_classes)  # the class CFG training drops labels to
    D_c, D_u = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, empty])).chunk(2)
    return D_u + guidance * (D_c - D_u)


def _randn(x: torch.Tensor, generator: torch.Generator | None, *, sampler: str) -> torch.Tensor:
    if generator is None:
        raise ValueError(f"{sampler} draws noise: pass generator=torch.Generator(device=...)")
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    guidance: Guidance = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler on the probability-flow ODE; one evaluation per step."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        D_x = guided(denoiser, x, sigma, labels=labels, guidance=guidance)
        x = D_x if sigma_next == 0 else x + (sigma_next - sigma) * (x - D_x) / sigma
    return x


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    guidance: Guidance = 1.0,
    generator: torch.Generator | None = None,
    S_churn: float = 0.0,  # EDM's defaults: deterministic
    S_tmin: float = 0.0,
    S_tmax: float | None = None,
    S_noise: float = 1.0,
) -> torch.Tensor:
    """EDM Algorithm 2: 2 N - 1 evaluations for N steps."""
    N = len(sigmas) - 1
    for i in range(N):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Step 1: churn, raise the noise level to sigma_hat and add the matching fresh noise.
        in_range = S_tmin <= sigma and (S_tmax is None or sigma <= S_tmax)
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_churn > 0 and in_range else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            eps = _randn(x, generator, sampler="heun with S_churn > 0")
            x = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * eps
        # Step 2: Euler from sigma_hat to sigma_next.
        d = (x - guided(denoiser, x, sigma_hat, labels=labels, guidance=guidance)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        # Step 3: trapezoidal correction, except into sigma = 0 where d is undefined.
        if sigma_next != 0:
            d_next = (
                x_next - guided(denoiser, x_next, sigma_next, labels=labels, guidance=guidance)
            ) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    guidance: Guidance = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM with stochasticity eta (0: deterministic); one evaluation per step."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        D_x = guided(denoiser, x, sigma, labels=labels, guidance=guidance)
        if sigma_next == 0:
            x = D_x
            continue
        eps_hat = (x - D_x) / sigma
        sigma_up = eta * sigma_next * (1 - sigma_next**2 / sigma**2).clamp(min=0).sqrt()
        x = D_x + (sigma_next**2 - sigma_up**2).sqrt() * eps_hat
        if eta > 0:
            x = x + sigma_up * _randn(x, generator, sampler="ddim with eta > 0")
    return x


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    guidance: Guidance = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling: the posterior q(x_{t'} | x_t, x0_hat) with variance beta_tilde."""
    if generator is None:
        raise ValueError("ddpm draws noise: pass generator=torch.Generator(device=...)")
    return ddim(denoiser, x, sigmas, labels=labels, guidance=guidance, generator=generator, eta=1.0)


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    guidance: Guidance = 1.0,
    refine: int = 0,
) -> torch.Tensor:
    """Deterministic DDIM encoding x0 -> x at sigmas[0] (run the eta = 0 grid `sigmas` backwards).

    Decoding steps x' = x + (sigma' - sigma) d(x; sigma) from the noisier point; inverting one step
    needs d at the unknown noisier x, so the first guess evaluates d at the current x and the target
    sigma (the usual DDIM inversion), and `refine` fixed-point iterations make the step exact.
    """
    x = x0
    ascending = sigmas.flip(0)
    for sigma, sigma_next in zip(ascending[:-1], ascending[1:], strict=True):
        guess = x
        for _ in range(refine + 1):
            d = (guess - guided(denoiser, guess, sigma_next, labels=labels, guidance=guidance)) / sigma_next
            guess = x + (sigma_next - sigma) * d
        x = guess
    return x


#: sampler name -> function.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun}


def sampler_options(sampling: SamplingConfig) -> dict[str, Any]:
    """The keyword knobs of `sampling.sampler` from the config."""
    if sampling.sampler == "ddim":
        return {"eta": sampling.eta}
    if sampling.sampler == "heun":
        return {
            "S_churn": sampling.S_churn,
            "S_tmin": sampling.S_tmin,
            "S_tmax": sampling.S_tmax,
            "S_noise": sampling.S_noise,
        }
    return {}


def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    *,
    model: DiffusionConfig,
    sampling: SamplingConfig,
    labels: torch.Tensor | None = None,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw x at sigmas[0] (x = sigma_max n, EDM's prior) from `generator` and run the chosen sampler."""
    check_sampling(model, sampling)
    sigmas = sampling_sigmas(model, sampling, device=device)
    x = sigmas[0] * torch.randn(shape, generator=generator, device=device)
    fn = SAMPLERS[sampling.sampler]
    guidance: Guidance = sampling.guidance
    if sampling.guidance_interval is not None and guidance != 1.0:
        lo, hi = sampling.guidance_interval
        guidance = guidance_in_interval(guidance, sigma_lo=lo, sigma_hi=hi)
    return fn(
        denoiser,
        x,
        sigmas,
        labels=labels,
        guidance=guidance,
        generator=generator,
        **sampler_options(sampling),
    )
