"""VQGAN losses (Esser et al. 2021, sec. 3.1, eq. 5-7).

L_rec = recon_weight * |x - x_rec| + perceptual_weight * perceptual(x, x_rec); the adversarial term
lambda * L_G with the adaptive weight (eq. 7)
    lambda = ||grad_{G_L}(L_rec)|| / (||grad_{G_L}(L_G)|| + delta),   delta = 1e-4,
where G_L is the decoder's last layer, clamped to [0, 1e4] and detached, as in taming-transformers.
The perceptual term follows LPIPS (Zhang et al. 2018) with unit layer weights: features of a frozen
network, unit-normalised over channels, squared differences summed over channels and averaged
over positions, summed over layers. Discriminator losses: hinge (Lim & Ye 2017) and the
non-saturating loss (Goodfellow et al. 2014).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]  # x (B, C, H, W) -> [(B, C_l, H_l, W_l), ...]


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


RECON_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": lambda x, x_rec: _per_sample((x - x_rec).abs()),
    "l2": lambda x, x_rec: _per_sample((x - x_rec) ** 2),
}


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, *, kind: str) -> torch.Tensor:
    """Per-sample (B,) mean absolute or squared error."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"unknown reconstruction loss {kind!r}; valid: {sorted(RECON_LOSSES)}")
    return RECON_LOSSES[kind](x, x_rec)


class PerceptualLoss:
    """LPIPS-style distance on a frozen feature network; per-sample (B,)."""

    def __init__(self, feature_fn: FeatureFn) -> None:
        self.feature_fn = feature_fn
        # Freeze the network behind the callable: a module itself or the owner of a bound method.
        owner = feature_fn if isinstance(feature_fn, nn.Module) else getattr(feature_fn, "__self__", None)
        self.net = owner if isinstance(owner, nn.Module) else None
        if self.net is not None:
            self.net.requires_grad_(False).eval()

    def to(self, device: torch.device) -> PerceptualLoss:
        if self.net is not None:
            self.net.to(device)
        return self

    def __call__(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        if self.net is not None:
            self.net.eval()  # stays in eval even if someone called .train() on it
        with torch.no_grad():
            target = self.feature_fn(x)
        total = x.new_zeros(x.shape[0])
        for f_x, f_rec in zip(target, self.feature_fn(x_rec), strict=True):
            diff = F.normalize(f_x.float(), dim=1, eps=1e-10) - F.normalize(f_rec.float(), dim=1, eps=1e-10)
            total = total + diff.pow(2).sum(dim=1).flatten(1).mean(dim=1)
        return total


def _hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def _non_saturating_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


DISC_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": _hinge_d,
    "non_saturating": _non_saturating_d,
}
GEN_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": lambda fake: -fake.mean(),
    "non_saturating": lambda fake: F.softplus(-fake).mean(),
}


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, *, kind: str) -> torch.Tensor:
    """Scalar discriminator loss on patch logits of real and reconstructed images."""
    if kind not in DISC_LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}; valid: {sorted(DISC_LOSSES)}")
    return DISC_LOSSES[kind](logits_real, logits_fake)


def generator_loss(logits_fake: torch.Tensor, *, kind: str) -> torch.Tensor:
    """Scalar adversarial loss L_G of the generator on the patch logits of its reconstructions."""
    if kind not in GEN_LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}; valid: {sorted(GEN_LOSSES)}")
    return GEN_LOSSES[kind](logits_fake)


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    weight: float = 1.0,
    max_weight: float = 1e4,
    delta: float = 1e-4,
) -> torch.Tensor:
    """Eq. 7: ||dL_rec/dG_L|| / (||dL_G/dG_L|| + delta), clamped to [0, max_weight], detached, * weight."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    lam = g_rec.norm() / (g_adv.norm() + delta)
    return lam.clamp(0.0, max_weight).detach() * weight
