"""Shared zoo helpers: label rows, the class-marginal likelihood, sample requests."""

from __future__ import annotations

import math

import pytest
import torch

from components.zoo.common import label_rows, marginal_nll, request


def test_label_rows_map_unlabelled_to_the_extra_row() -> None:
    assert label_rows(torch.tensor([0, -1, 2]), num_classes=3).tolist() == [0, 3, 2]
    assert label_rows(torch.tensor([0, -1]), num_classes=0) is None
    with pytest.raises(ValueError, match=r"labels must lie in 0..2 or be -1 \(unlabelled\), got -2..1"):
        label_rows(torch.tensor([-2, 1]), num_classes=3)


def test_marginal_nll_is_the_uniform_mixture() -> None:
    per_class = torch.tensor([[1.0, 5.0], [3.0, 5.0], [9.0, 5.0]])  # (K, n) of -log p(x|y)

    def nll(y):
        return per_class[y[0]]

    out = marginal_nll(nll, n=2, num_classes=3, device=torch.device("cpu"))
    expected = -torch.log(torch.exp(-per_class).mean(0))
    torch.testing.assert_close(out, expected)
    assert out[1].item() == pytest.approx(5.0)  # equal likelihoods: the mixture changes nothing
    assert per_class[:, 0].min() <= out[0] <= per_class[:, 0].min() + math.log(3)
    assert torch.equal(marginal_nll(lambda y: torch.ones(2), n=2, num_classes=0, device=None), torch.ones(2))


def test_request_draws_classes_for_a_count() -> None:
    n, y = request(5, num_classes=4, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert n == 5 and y.shape == (5,) and int(y.min()) >= 0 and int(y.max()) < 4
    assert request(3, num_classes=0, generator=torch.Generator(), device=torch.device("cpu")) == (3, None)
    with pytest.raises(ValueError, match="unconditional"):
        request(torch.tensor([0]), num_classes=0, generator=torch.Generator(), device=torch.device("cpu"))
