"""The adversarial losses, apart from the networks (as diffusion/loss.py holds the denoising loss).

Each takes the discriminator's scores (logits l, or critic values C) and returns a scalar loss and a
dict of detached diagnostics; the task decides which images and labels the scores come from.
- "ns", the non-saturating game (Goodfellow et al. 2014, sec. 3), D(x) = sigmoid(l(x)):
    L_D = softplus(-l(x)) + softplus(l(G(z))),   L_G = softplus(-l(G(z))).
- "wgan_gp" (Gulrajani et al. 2017, eq. 3), x_hat = eps x + (1 - eps) G(z):
    L_C = C(G(z)) - C(x) + lambda (||grad_x_hat C(x_hat)||_2 - 1)^2,   L_G = -C(G(z)).
- R1 (Mescheder et al. 2018, eq. 9): gamma / 2 ||grad_x D(x)||^2 on reals.
- Mode seeking (Mao et al. 2019, eq. 3): lambda / (mean|G(z1, y) - G(z2, y)| / mean|z1 - z2|).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def r1_penalty(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||grad_x D(x)||^2 per sample (B,) on real images (Mescheder et al. 2018, eq. 9); graph kept."""
    (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1)


def gradient_penalty(scores: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(||grad_x_hat C(x_hat)||_2 - 1)^2 per sample, (B,) (Gulrajani et al. 2017, eq. 3).

    `scores` (B,) must come from `x_hat` (B, ...) with requires_grad; the graph is kept so that the
    penalty's own gradient reaches the critic's weights.
    """
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2)


def ns_discriminator(
    real_s: torch.Tensor, fake_s: torch.Tensor, *, x: torch.Tensor | None = None, r1_weight: float = 0.0
) -> tuple[torch.Tensor, Metrics]:
    """L_D of the non-saturating game, plus gamma / 2 R1 when `r1_weight` > 0 (`x`: the reals, with grad)."""
    loss = F.softplus(-real_s).mean() + F.softplus(fake_s).mean()
    metrics = {
        "d_loss": loss.detach(),
        "d_real": torch.sigmoid(real_s.detach()).mean(),
        "d_fake": torch.sigmoid(fake_s.detach()).mean(),
    }
    if r1_weight <= 0:
        return loss, metrics
    if x is None:
        raise ValueError("r1_weight > 0 needs the real images x the scores came from")
    penalty = r1_penalty(real_s, x).mean()
    return loss + 0.5 * r1_weight * penalty, metrics | {"r1": penalty.detach()}


def wgan_critic(
    real_s: torch.Tensor, fake_s: torch.Tensor, hat_s: torch.Tensor, x_hat: torch.Tensor, *, gp_weight: float
) -> tuple[torch.Tensor, Metrics]:
    """L_C = -(C(x) - C(G(z))) + lambda GP; the Wasserstein estimate C(x) - C(G(z)) is logged."""
    gp = gradient_penalty(hat_s, x_hat).mean()
    wasserstein = real_s.mean() - fake_s.mean()
    return -wasserstein + gp_weight * gp, {"wasserstein": wasserstein.detach(), "gp": gp.detach()}


def generator_loss(loss: str, fake_s: torch.Tensor) -> torch.Tensor:
    """L_G of `loss` ("ns" or "wgan_gp") from the scores of the fakes."""
    if loss == "wgan_gp":
        return -fake_s.mean()
    if loss == "ns":
        return F.softplus(-fake_s).mean()
    raise ValueError(f"unknown adversarial loss {loss!r}; valid: ns, wgan_gp")


def mode_seeking(fake: torch.Tensor, z: torch.Tensor, *, pairs: int) -> torch.Tensor:
    """The ratio mean|G(z_i) - G(z_i+h)| / mean|z_i - z_i+h| over the first h = `pairs` pairs (same class)."""
    h = pairs
    return (fake[:h] - fake[h : 2 * h]).abs().mean() / (z[:h] - z[h : 2 * h]).abs().mean()
