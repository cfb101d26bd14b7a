"""Shared sampling pieces: top-k / top-p keep exactly the right set, guidance, mask schedule endpoints."""

from __future__ import annotations

import math

import pytest
import torch

from components.prior.sampling import (
    MASK_SCHEDULES,
    filter_logits,
    guide,
    mask_ratio,
    top_k_filter,
    top_p_filter,
)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_the_k_largest(k: int) -> None:
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(k))
    out = top_k_filter(logits, k=k)
    for row, filtered in zip(logits, out, strict=True):
        assert kept(filtered) == set(row.argsort(descending=True)[:k].tolist())
        assert torch.equal(filtered[torch.isfinite(filtered)], row[torch.isfinite(filtered)])  # untouched


def test_top_k_with_ties_keeps_exactly_k_and_off_values_are_identity() -> None:
    logits = torch.zeros(3, 8)
    assert (torch.isfinite(top_k_filter(logits, k=3)).sum(-1) == 3).all()
    x = torch.randn(2, 8)
    for k in (None, 0, 8, 20):
        assert torch.equal(top_k_filter(x, k=k), x)


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.01, {2}), (0.49, {2}), (0.51, {2, 0}), (0.79, {2, 0}), (0.81, {2, 0, 3}), (0.96, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_with_enough_mass(p: float, expected: set[int]) -> None:
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15])  # sorted: 2 (0.5), 0 (0.3), 3 (0.15), 1 (0.05)
    assert kept(top_p_filter(probs.log(), p=p)) == expected


def test_top_p_matches_brute_force_on_random_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=g) * 2
    ps = torch.rand(200, generator=g) * 0.98 + 0.01
    for row, p in zip(logits, ps.tolist(), strict=True):
        probs = row.double().softmax(-1)
        order = probs.argsort(descending=True)
        size = next(i + 1 for i in range(12) if probs[order[: i + 1]].sum() >= p)
        assert kept(top_p_filter(row[None], p=p)[0]) == set(order[:size].tolist())


def test_top_p_one_is_identity_and_bad_p_is_an_error() -> None:
    x = torch.randn(4, 6)
    assert torch.equal(top_p_filter(x, p=1.0), x)
    for p in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"top_p=.* must lie in \(0, 1\]"):
            top_p_filter(x, p=p)


def test_temperature_scales_logits_before_filtering() -> None:
    x = torch.randn(3, 5)
    torch.testing.assert_close(filter_logits(x, temperature=0.5), x / 0.5)
    with pytest.raises(ValueError, match="temperature=0"):
        filter_logits(x, temperature=0)


def test_guidance_combines_conditional_and_unconditional_logits() -> None:
    l_c, l_u = torch.randn(2, 7), torch.randn(2, 7)
    both = torch.cat([l_c, l_u])
    torch.testing.assert_close(guide(both, scale=1.0), l_c)
    torch.testing.assert_close(guide(both, scale=0.0), l_u)
    torch.testing.assert_close(guide(both, scale=3.0), l_u + 3.0 * (l_c - l_u))


@pytest.mark.parametrize("schedule", sorted(MASK_SCHEDULES))
def test_mask_schedule_endpoints_and_monotone(schedule: str) -> None:
    assert float(mask_ratio(0.0, schedule=schedule)) == 1.0
    assert float(mask_ratio(1.0, schedule=schedule)) == 0.0
    gamma = mask_ratio(torch.linspace(0, 1, 101), schedule=schedule)
    assert (gamma.diff() < 0).all() and gamma.min() >= 0 and gamma.max() <= 1
    formula = {"cosine": math.cos(math.pi / 2 * 0.3), "linear": 0.7, "square": 1 - 0.09}
    assert float(mask_ratio(0.3, schedule=schedule)) == pytest.approx(formula[schedule])


def test_unknown_schedule_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown mask schedule 'exp'; valid: cosine, linear, square"):
        mask_ratio(0.5, schedule="exp")
