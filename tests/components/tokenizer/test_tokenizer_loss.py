"""VQGAN loss parts: adaptive weight (eq. 7) against a hand computation, GAN losses, perceptual loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.tokenizer.loss import (
    PerceptualLoss,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)

torch.set_num_threads(1)


def test_adaptive_weight_matches_hand_computation() -> None:
    # x_rec = W h with last layer W (3x2); L_rec = ||x - W h||^2, L_G = -a . (W h)
    w = torch.tensor([[1.0, 0.5], [0.0, 2.0], [-1.0, 1.0]], requires_grad=True)
    h, x, a = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.3, -0.1, 0.2])
    x_rec = w @ h
    rec, g = (x - x_rec).pow(2).sum(), -(a * x_rec).sum()
    # dL_rec/dW = -2 (x - W h) h^T, dL_G/dW = -a h^T; Frobenius norms of outer products factor
    r = (x - x_rec).detach()
    expected = (2 * r.norm() * h.norm()) / (a.norm() * h.norm() + 1e-4)
    lam = adaptive_weight(rec, g, w, weight=0.8)
    assert lam.item() == pytest.approx(0.8 * expected.item(), rel=1e-5)
    assert not lam.requires_grad


def test_adaptive_weight_is_clamped() -> None:
    w = torch.ones(2, requires_grad=True)
    rec = (w * 3.0).sum()
    g = (w * 1e-9).sum()  # vanishing adversarial gradient
    assert adaptive_weight(rec, g, w, max_weight=1e4).item() == pytest.approx(1e4)


def test_gan_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 * (0.25 + 0.5)
    assert discriminator_loss(real, fake, kind="hinge").item() == pytest.approx(0.375)
    assert generator_loss(fake, kind="hinge").item() == pytest.approx(1.0)
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert discriminator_loss(real, fake, kind="non_saturating").item() == pytest.approx(expected.item())
    assert generator_loss(fake, kind="non_saturating").item() == pytest.approx(sp(-fake).mean().item())
    with pytest.raises(ValueError, match=r"valid: \['hinge', 'non_saturating'\]"):
        discriminator_loss(real, fake, kind="wasserstein")


def test_reconstruction_losses_are_per_sample() -> None:
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, -2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert torch.allclose(reconstruction_loss(x, y, kind="l1"), torch.tensor([1.0, 2.0]))
    assert torch.allclose(reconstruction_loss(x, y, kind="l2"), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match=r"valid: \['l1', 'l2'\]"):
        reconstruction_loss(x, y, kind="huber")


class _Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.a(x)
        return [f1, self.b(f1)]


def test_perceptual_loss_freezes_the_network_and_trains_the_input() -> None:
    net = _Features().train()
    loss = PerceptualLoss(net.feature_maps)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(loss(x, x.clone()), torch.zeros(3), atol=1e-6)
    x_rec = torch.randn(3, 1, 8, 8, requires_grad=True)
    d = loss(x, x_rec)
    assert d.shape == (3,) and (d > 0).all()
    d.sum().backward()
    assert x_rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_perceptual_loss_is_scale_invariant_per_layer() -> None:
    # unit-normalised channels: a positive scaling of the features changes nothing
    loss = PerceptualLoss(lambda x: [x, 2 * x])
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    scaled = PerceptualLoss(lambda x: [5 * x, 7 * x])
    assert torch.allclose(loss(x, y), scaled(x, y), atol=1e-5)
