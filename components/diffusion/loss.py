"""The denoising loss of every objective (Karras et al. 2022, eq. 8; EDM `loss.py`).

    L(x0, sigma, n) = lambda(sigma) * mean_pixels || D(x0 + sigma n; sigma) - x0 ||^2,

with lambda = 1 / c_out^2 from `noise.loss_weight`, which makes it the paper's own loss: DDPM's
L_simple on eps (or on v), flow matching's velocity MSE, EDM's weighted denoising loss. Noise and
sigma are arguments (k-diffusion `Denoiser.loss`): the caller draws them, the loop reduces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from components.diffusion.config import DiffusionConfig
from components.diffusion.noise import loss_weight


def denoising_loss(
    denoiser: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    config: DiffusionConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample loss (B,) and detached diagnostics, for x0 (B, C, H, W), sigma (B,), noise like x0."""
    if sigma.shape != (x0.shape[0],) or noise.shape != x0.shape:
        raise ValueError(
            f"sigma must be (B,) = ({x0.shape[0]},) and noise like x0 {tuple(x0.shape)}, "
            f"got {tuple(sigma.shape)} and {tuple(noise.shape)}"
        )
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    D_x = denoiser(x, sigma, labels)
    mse = (D_x.float() - x0.float()).pow(2).flatten(1).mean(1)  # (B,): mean over C, H, W
    loss = loss_weight(sigma.float(), config=config) * mse
    return loss, {"denoise_mse": mse.detach().mean(), "log_sigma": sigma.detach().log().mean()}


def drop_labels(
    labels: torch.Tensor, *, rate: float, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the empty class `num_classes` with probability `rate` (CFG training).

    Unlabelled samples (label -1) always get the empty class.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"label dropout rate={rate} must lie in [0, 1)")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < rate
    return torch.where(drop | (labels < 0), torch.full_like(labels, num_classes), labels)
