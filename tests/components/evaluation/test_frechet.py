"""Fréchet distance against its closed form, streaming statistics, and their file round trip."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from components.evaluation.evaluator import Evaluator, EvaluatorConfig
from components.evaluation.frechet import (
    FeatureStats,
    StatsAccumulator,
    extract_features,
    feature_stats,
    frechet_distance,
)

torch.set_num_threads(1)


def _stats(mu, sigma, n: int = 1000) -> FeatureStats:
    return FeatureStats(
        mu=torch.as_tensor(mu, dtype=torch.float64), sigma=torch.as_tensor(sigma, dtype=torch.float64), n=n
    )


def _random_psd(d: int, *, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_identical_sets_give_zero() -> None:
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    s = FeatureStats.from_features(f)
    assert abs(frechet_distance(s, s)) < 1e-9


def test_identical_rank_deficient_sets_are_near_zero() -> None:
    f = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))  # n < D: singular sigma
    s = FeatureStats.from_features(f)
    assert abs(frechet_distance(s, s)) < 1e-9  # torchmetrics' eigvals route gives about -1e-5 here


def test_mean_shift_with_identity_covariance() -> None:
    mu = torch.tensor([1.0, -2.0, 0.5])
    assert frechet_distance(_stats(torch.zeros(3), torch.eye(3)), _stats(mu, torch.eye(3))) == pytest.approx(
        5.25
    )


def test_diagonal_covariances() -> None:
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum())  # per dim: (sqrt(a) - sqrt(b))^2
    got = frechet_distance(_stats(torch.zeros(3), torch.diag(a)), _stats(torch.zeros(3), torch.diag(b)))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rank", [None, 3])
def test_general_covariances_match_scipy_sqrtm(rank: int | None) -> None:
    s1, s2 = _random_psd(8, seed=1, rank=rank), _random_psd(8, seed=2)
    mu1, mu2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())
    expected = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace()) - 2 * float(np.trace(covmean).real)
    assert frechet_distance(_stats(mu1, s1), _stats(mu2, s2)) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    assert frechet_distance(_stats(mu1, s1), _stats(mu2, s2)) == pytest.approx(
        frechet_distance(_stats(mu2, s2), _stats(mu1, s1)), rel=1e-10
    )


def test_sampled_gaussians_approach_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, 0.0, -1.0, 2.0])
    scale = torch.tensor([1.0, 2.0, 0.5, 1.0])  # N(mu, diag(scale^2)) against N(0, I)
    a = torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(200_000, 4, generator=g, dtype=torch.float64) * scale + mu
    expected = float((mu**2).sum() + ((scale - 1) ** 2).sum())  # 6 + 1.25
    got = frechet_distance(FeatureStats.from_features(a), FeatureStats.from_features(b))
    assert got == pytest.approx(expected, abs=0.05)


def test_streaming_matches_one_batch() -> None:
    f = torch.randn(301, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3 + 100
    acc = StatsAccumulator()
    for chunk in f.split(37):
        acc.update(chunk)
    s = acc.stats()
    assert s.n == 301
    torch.testing.assert_close(s.mu, f.mean(dim=0), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(s.sigma, torch.cov(f.T), rtol=1e-10, atol=1e-10)


def test_save_load_round_trip(tmp_path) -> None:
    s = FeatureStats.from_features(torch.randn(50, 6))
    s.save(tmp_path / "sub" / "test_stats.safetensors")
    back = FeatureStats.load(tmp_path / "sub" / "test_stats.safetensors")
    assert back.n == 50 and back.mu.dtype == torch.float64
    assert torch.equal(back.mu, s.mu) and torch.equal(back.sigma, s.sigma)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        FeatureStats.load(tmp_path / "missing.safetensors")


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(torch.randn(1, 4))
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(_stats(torch.zeros(2), torch.eye(2)), _stats(torch.zeros(3), torch.eye(3)))


def test_feature_stats_streams_images_through_the_evaluator() -> None:
    cfg = EvaluatorConfig(widths=(8, 16), feature_dim=10, norm_groups=4, dropout=0.5)
    net = Evaluator.from_config(cfg, in_channels=1, num_classes=3)  # left in train mode on purpose
    x = torch.rand(40, 1, 16, 16) * 2 - 1
    f = extract_features(net, x, batch_size=16)
    assert f.shape == (40, net.feature_dim) and net.feature_dim == 10 + 4 and net.training
    s_tensor = feature_stats(net, x, batch_size=16)
    s_iter = feature_stats(net, iter(x.split(7)))
    with torch.no_grad():
        expected = FeatureStats.from_features(net.eval().features(x))
    torch.testing.assert_close(s_tensor.mu, expected.mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_iter.sigma, expected.sigma, rtol=1e-4, atol=1e-6)
