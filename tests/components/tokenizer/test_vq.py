"""VQ: loss terms, EMA codebook update, dead-code restart, statistics only from training forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.tokenizer.vq import VectorQuantizer

torch.set_num_threads(1)


def _grid(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (1, D, 1, N): N positions of one image."""
    return vectors.T[None, :, None, :]


def test_loss_is_codebook_plus_beta_commitment() -> None:
    q = VectorQuantizer(codebook_size=8, dim=3, beta=0.25, restart_dead=False)
    z = torch.randn(2, 3, 4, 4)
    out = q(z)
    e_k = q.indices_to_codes(out.indices)
    mse = F.mse_loss(z, e_k)
    assert out.loss.item() == pytest.approx((1 + 0.25) * mse.item(), rel=1e-5)
    # the codebook term trains the codes, the commitment term the encoder
    z.requires_grad_(True)
    out = q(z)
    g_code, g_z = torch.autograd.grad(out.loss, (q.codebook, z))
    assert g_code.abs().sum() > 0
    assert torch.allclose(g_z, 0.25 * 2 * (z - e_k) / z.numel(), atol=1e-7)


def test_ema_has_no_codebook_term_and_no_codebook_parameter() -> None:
    q = VectorQuantizer(codebook_size=8, dim=3, ema=True, restart_dead=False)
    assert not any(p is q.codebook for p in q.parameters())
    z = torch.randn(2, 3, 4, 4)
    out = q(z)
    assert out.loss.item() == pytest.approx(
        0.25 * F.mse_loss(z, q.indices_to_codes(out.indices)).item(), rel=1e-5
    )


def test_ema_moves_codes_toward_their_assigned_inputs() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=4, dim=2, ema=True, decay=0.9, restart_dead=False)
    q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    q.embed_sum.copy_(q.codebook)
    targets = torch.tensor([[2.0, 0.1], [0.1, 2.0], [-2.0, 0.1], [0.1, -2.0]])
    z = _grid(targets.repeat_interleave(8, dim=0) + 0.01 * torch.randn(32, 2))
    before = (q.codebook - targets).norm(dim=1)
    for _ in range(30):
        q(z.requires_grad_(True))
        q.update()
    after = (q.codebook - targets).norm(dim=1)
    assert (after < 0.1 * before).all(), (before, after)
    assert torch.allclose(q.cluster_size.sum(), torch.tensor(32.0), rtol=0.05)


def test_dead_code_is_restarted_with_a_recent_encoder_output() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=4, dim=2, ema=False, restart_dead=True, dead_threshold=1.0)
    with torch.no_grad():
        q.codebook.copy_(
            torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [50.0, 50.0]])
        )  # code 3: never nearest
    z_e = torch.tensor([[1.1, 0.9], [-0.9, 1.2], [0.8, -1.1], [1.2, 1.1], [-1.1, 0.8], [0.9, -0.9]])
    q(_grid(z_e).requires_grad_(True))
    q.update()
    assert q.num_restarted == 1
    new = q.codebook.detach()[3]
    assert (new - z_e).norm(dim=1).min() < 1e-6, "the dead code must become one of the recent z_e"
    assert torch.equal(q.codebook.detach()[:3], torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]))
    assert q.cluster_size[3] == pytest.approx(1.0)


def test_ema_restart_keeps_the_running_sum_consistent() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=8, dim=2, ema=True, restart_dead=True, dead_threshold=1.0)
    z = _grid(torch.randn(64, 2))
    for _ in range(5):
        q(z.requires_grad_(True))
        q.update()
    n = q.cluster_size.sum()
    smoothed = (q.cluster_size + q.eps) / (n + 8 * q.eps) * n
    assert torch.allclose(q.embed_sum / smoothed[:, None], q.codebook, atol=1e-4)
    assert q.num_restarted > 0


def test_no_grad_and_eval_forwards_leave_the_codebook_alone() -> None:
    q = VectorQuantizer(codebook_size=8, dim=2, ema=True, restart_dead=True)
    before = q.codebook.clone()
    z = _grid(torch.randn(16, 2))
    with torch.no_grad():
        q(z)  # e.g. the discriminator phase's reconstruction
    q.eval()
    q(z.requires_grad_(True))
    q.update()
    assert torch.equal(q.codebook, before)


def test_cosine_codes_stay_unit_norm_under_ema() -> None:
    q = VectorQuantizer(codebook_size=8, dim=3, ema=True, cosine=True)
    for _ in range(3):
        q(torch.randn(2, 3, 4, 4, requires_grad=True))
        q.update()
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(8), atol=1e-5)
