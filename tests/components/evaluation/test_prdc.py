"""Improved precision/recall and density/coverage on sets with known answers."""

from __future__ import annotations

import pytest
import torch

from components.evaluation.prdc import knn_radii, prdc

torch.set_num_threads(1)


def _blob(n: int, *, centre: float, seed: int, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + centre


def test_knn_radii_excludes_the_point_itself() -> None:
    f = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    torch.testing.assert_close(knn_radii(f, k=1), torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(knn_radii(f, k=2), torch.tensor([3.0, 2.0, 3.0, 5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="k=4"):
        knn_radii(f, k=4)


def test_identical_sets_have_full_precision_recall_coverage() -> None:
    f = _blob(200, centre=0.0, seed=0)
    m = prdc(f, f.clone(), k=3)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["coverage"] == 1.0
    # Ball i holds its own point and exactly its k nearest neighbours (no ties): density = (k + 1) / k.
    assert m["density"] == pytest.approx(4 / 3)


def test_disjoint_far_sets_score_zero() -> None:
    m = prdc(_blob(150, centre=0.0, seed=0), _blob(150, centre=100.0, seed=1), k=3)
    assert m == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_fake_covering_one_of_two_modes() -> None:
    real = torch.cat([_blob(200, centre=0.0, seed=0), _blob(200, centre=50.0, seed=1)])
    fake = _blob(200, centre=0.0, seed=2)  # mode collapse onto the first mode
    m = prdc(real, fake, k=3)
    assert m["precision"] > 0.9  # what it makes is realistic
    assert 0.4 <= m["recall"] <= 0.5  # but only half the real data is within reach
    assert 0.4 <= m["coverage"] <= 0.5


def test_same_distribution_scores_high() -> None:
    m = prdc(_blob(400, centre=0.0, seed=0), _blob(400, centre=0.0, seed=1), k=3)
    assert m["precision"] > 0.8 and m["recall"] > 0.8
    assert m["density"] == pytest.approx(1.0, abs=0.25)  # Naeem et al.: ~1 for matching distributions


def test_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match="real and fake"):
        prdc(torch.randn(10, 3), torch.randn(10, 4))
