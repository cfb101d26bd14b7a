"""FSQ: implicit codebook and the indices <-> codes bijection; Gumbel: eval one-hots, tau, KL."""

from __future__ import annotations

import math

import pytest
import torch

from components.tokenizer.fsq import FiniteScalarQuantizer
from components.tokenizer.gumbel import GumbelQuantizer, gumbel_tau

torch.set_num_threads(1)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 4, 4), (2, 3), (7,)])
def test_fsq_codebook_size_and_bijection(levels: tuple[int, ...]) -> None:
    q = FiniteScalarQuantizer(levels=levels)
    k = math.prod(levels)
    assert q.codebook_size == k and q.dim == len(levels)
    indices = torch.arange(k).view(1, 1, k)
    codes = q.indices_to_codes(indices)  # (1, d, 1, K)
    assert codes.shape == (1, len(levels), 1, k)
    assert len({tuple(c) for c in codes[0, :, 0].T.tolist()}) == k, "codes must be distinct"
    assert codes.min() >= -1 and codes.max() <= 1
    out = q(_preimage(q, codes))
    assert torch.equal(out.indices, indices)
    assert torch.allclose(out.z_q, codes)


def _preimage(q: FiniteScalarQuantizer, codes: torch.Tensor) -> torch.Tensor:
    """A z that f(z) maps exactly onto the grid point of `codes`."""
    width = q._width.view(1, -1, 1, 1)
    target = codes * width  # integer grid point z_hat
    return torch.atanh((target + q._offset.view(1, -1, 1, 1)) / q._half.view(1, -1, 1, 1)) - q._shift.view(
        1, -1, 1, 1
    )


@pytest.mark.parametrize("levels", [(8,), (5,), (4,)])
def test_fsq_uses_exactly_l_values_per_channel(levels: tuple[int, ...]) -> None:
    q = FiniteScalarQuantizer(levels=levels)
    out = q(torch.linspace(-20, 20, 4001).view(1, 1, 1, -1))
    assert len(out.z_q.unique()) == levels[0]
    assert out.loss.item() == 0.0
    assert int(out.indices.min()) == 0 and int(out.indices.max()) == levels[0] - 1


def test_fsq_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="levels=\\[8, 1\\]"):
        FiniteScalarQuantizer(levels=(8, 1))


def test_gumbel_eval_gives_hard_deterministic_one_hots() -> None:
    q = GumbelQuantizer(codebook_size=10, dim=4).eval()
    z = torch.randn(2, 4, 3, 3)
    out, again = q(z), q(z)
    assert torch.equal(out.indices, again.indices)
    assert torch.equal(out.indices, q.proj(z).argmax(dim=1))
    assert torch.allclose(out.z_q, q.embed.weight[out.indices].permute(0, 3, 1, 2), atol=1e-6)


def test_gumbel_training_is_soft_unless_hard() -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3)
    soft = GumbelQuantizer(codebook_size=10, dim=4, hard=False, tau=1.0).train()
    hard = GumbelQuantizer(codebook_size=10, dim=4, hard=True, tau=1.0).train()
    hard.load_state_dict(soft.state_dict())
    codes = soft.embed.weight[soft(z).indices].permute(0, 3, 1, 2)
    assert not torch.allclose(soft(z).z_q, codes, atol=1e-3)
    out = hard(z)
    assert torch.allclose(out.z_q, hard.embed.weight[out.indices].permute(0, 3, 1, 2), atol=1e-6)


def test_gumbel_kl_to_uniform() -> None:
    q = GumbelQuantizer(codebook_size=8, dim=4, kl_weight=1.0).eval()
    torch.nn.init.zeros_(q.proj.weight)
    torch.nn.init.zeros_(q.proj.bias)
    assert q(torch.randn(1, 4, 2, 2)).loss.item() == pytest.approx(0.0, abs=1e-6)
    torch.nn.init.constant_(q.proj.bias, 0.0)
    q.proj.bias.data[0] = 100.0  # all mass on one code: KL = log K
    assert q(torch.randn(1, 4, 2, 2)).loss.item() == pytest.approx(math.log(8), rel=1e-4)


def test_gumbel_diversity_penalises_a_collapsed_batch_not_confident_positions() -> None:
    # Each position certain of its own code, all K codes used equally: per-position KL = log K,
    # batch-mean q uniform, so the diversity term is 0. All positions on one code: both are log K.
    k = 4
    q = GumbelQuantizer(codebook_size=k, dim=k, kl_weight=0.0, diversity_weight=1.0).eval()
    with torch.no_grad():
        q.proj.weight.copy_(100.0 * torch.eye(k).view(k, k, 1, 1))
        q.proj.bias.zero_()
    spread = torch.eye(k).view(1, k, 2, 2)  # position p has z = e_p: logits favour code p
    out = q(spread)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-5)
    assert out.diagnostics["diversity_kl"].item() == pytest.approx(0.0, abs=1e-5)
    collapsed = torch.eye(k)[0].view(1, k, 1, 1).expand(1, k, 2, 2)
    assert q(collapsed).loss.item() == pytest.approx(math.log(k), rel=1e-4)
    # Short of saturation, its gradient lowers the over-used code's logit and raises the others.
    with torch.no_grad():
        q.proj.weight.mul_(0.02)  # logits 2 apart: q = (0.71, 0.10, 0.10, 0.10) everywhere
    q(collapsed).loss.backward()
    assert q.proj.bias.grad[0] > 0 and (q.proj.bias.grad[1:] < 0).all()


def test_gumbel_tau_schedule_is_exponential() -> None:
    kw = dict(tau_start=1.0, tau_end=1 / 16, anneal_steps=100)
    assert gumbel_tau(0, **kw) == pytest.approx(1.0)
    assert gumbel_tau(50, **kw) == pytest.approx(0.25)  # geometric midpoint
    assert gumbel_tau(100, **kw) == pytest.approx(1 / 16)
    assert gumbel_tau(10_000, **kw) == pytest.approx(1 / 16)
