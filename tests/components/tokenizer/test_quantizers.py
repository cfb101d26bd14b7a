"""Common quantizer interface: shapes, straight-through gradients, indices <-> codes, registry, usage."""

from __future__ import annotations

import math

import pytest
import torch

from components.tokenizer.base import CodeUsage, QuantizerOutput
from components.tokenizer.config import QuantizerConfig
from components.tokenizer.quantizers import QUANTIZERS, build_quantizer

torch.set_num_threads(1)

CONFIGS = {
    "vq": QuantizerConfig(kind="vq", codebook_size=16),
    "vq_ema": QuantizerConfig(kind="vq", codebook_size=16, ema=True),
    "vq_cosine": QuantizerConfig(kind="vq", codebook_size=16, cosine=True),
    "gumbel": QuantizerConfig(kind="gumbel", codebook_size=16),
    "gumbel_hard": QuantizerConfig(kind="gumbel", codebook_size=16, hard=True),
    "fsq": QuantizerConfig(kind="fsq", codebook_size=60, levels=(5, 4, 3)),
}


def _dim(cfg: QuantizerConfig) -> int:
    return len(cfg.levels) if cfg.kind == "fsq" else 4


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes_and_dtypes(name: str, training: bool) -> None:
    cfg = CONFIGS[name]
    q = build_quantizer(cfg, dim=_dim(cfg)).train(training)
    z = torch.randn(3, _dim(cfg), 5, 6)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.z_q.shape == z.shape
    assert out.indices.shape == (3, 5, 6) and out.indices.dtype == torch.int64
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert 0 < float(out.diagnostics["batch_usage"]) <= 1
    assert 1 <= float(out.diagnostics["perplexity"]) <= q.codebook_size + 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eval_codes_match_indices(name: str) -> None:
    cfg = CONFIGS[name]
    q = build_quantizer(cfg, dim=_dim(cfg)).eval()
    out = q(torch.randn(2, _dim(cfg), 4, 4))
    assert torch.allclose(q.indices_to_codes(out.indices), out.z_q, atol=1e-6)


@pytest.mark.parametrize("name", ["vq", "vq_ema"])
def test_vq_straight_through_is_identity(name: str) -> None:
    q = build_quantizer(CONFIGS[name], dim=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    (grad,) = torch.autograd.grad((q(z).z_q * g).sum(), z)
    assert torch.equal(grad, g)


def test_cosine_vq_passes_gradients_through_the_normalisation() -> None:
    q = build_quantizer(CONFIGS["vq_cosine"], dim=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    (grad,) = torch.autograd.grad((q(z).z_q * g).sum(), z)
    (expected,) = torch.autograd.grad((torch.nn.functional.normalize(z, dim=1) * g).sum(), z)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_fsq_straight_through_rounding() -> None:
    q = build_quantizer(CONFIGS["fsq"], dim=3)
    z = torch.randn(2, 3, 3, 3, requires_grad=True)
    g = torch.randn(2, 3, 3, 3)
    (grad,) = torch.autograd.grad((q(z).z_q * g).sum(), z)
    width = torch.tensor([2.0, 2.0, 1.0]).view(1, 3, 1, 1)  # L // 2 for levels (5, 4, 3)
    (expected,) = torch.autograd.grad((q.bound(z) / width * g).sum(), z)
    assert torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["gumbel", "gumbel_hard"])
def test_gumbel_gradients_reach_the_encoder(name: str) -> None:
    q = build_quantizer(CONFIGS[name], dim=4).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    (grad,) = torch.autograd.grad(out.z_q.square().sum() + out.loss, z)
    assert grad.abs().sum() > 0


def test_registry_names_and_unknown_kind() -> None:
    assert set(QUANTIZERS) == {"vq", "gumbel", "fsq"}
    bogus = QuantizerConfig.model_construct(**{**QuantizerConfig().model_dump(), "kind": "rvq"})
    with pytest.raises(ValueError, match=r"unknown quantizer 'rvq'; valid: \['fsq', 'gumbel', 'vq'\]"):
        build_quantizer(bogus, dim=4)


def test_code_usage_tracker() -> None:
    usage = CodeUsage(8)
    usage.update(torch.tensor([[0, 1], [1, 1]]))
    usage.update(torch.tensor([2, 3]))
    assert usage.usage() == pytest.approx(4 / 8)
    p = torch.tensor([1, 3, 1, 1]) / 6
    assert usage.perplexity() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    usage.reset()
    usage.update(torch.arange(8))
    assert usage.usage() == 1.0 and usage.perplexity() == pytest.approx(8.0)
