"""PSNR and SSIM on cases with known values."""

from __future__ import annotations

import math

import pytest
import torch

from components.evaluation.recon import ReconScore, psnr, recon_metrics, ssim

torch.set_num_threads(1)


def _images(n: int = 3, c: int = 1, size: int = 16) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8


def test_psnr_of_a_constant_offset() -> None:
    x = _images()
    got = psnr(x + 0.1, x)  # MSE = 0.01, range 2: 10 log10(4 / 0.01)
    torch.testing.assert_close(got, torch.full((3,), 10 * math.log10(400)), rtol=1e-5, atol=1e-4)
    on_unit = psnr((x + 1) / 2 + 0.05, (x + 1) / 2, data_range=1.0)  # same images on [0, 1]
    torch.testing.assert_close(on_unit, got, rtol=1e-5, atol=1e-4)


def test_psnr_is_per_image() -> None:
    x = _images()
    y = x.clone()
    y[1] += 0.2
    got = psnr(y, x)
    assert got[0] == math.inf and got[2] == math.inf
    assert got[1].item() == pytest.approx(10 * math.log10(4 / 0.04), rel=1e-5)


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 16), (3, 32)])
def test_ssim_of_identical_images_is_one(channels: int, size: int) -> None:
    x = _images(c=channels, size=size)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))


def test_ssim_falls_with_noise() -> None:
    x = _images(n=4)
    g = torch.Generator().manual_seed(1)
    noisy = [
        ssim((x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1), x).mean() for s in (0.05, 0.2, 0.5)
    ]
    assert 1 > noisy[0] > noisy[1] > noisy[2]


def test_ssim_of_a_constant_offset_is_the_luminance_term() -> None:
    x = torch.zeros(1, 1, 16, 16)
    y = x + 0.5  # flat images: only the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) differs
    c1 = (0.01 * 2.0) ** 2
    expected = c1 / (0.25 + c1)
    assert ssim(y, x).item() == pytest.approx(expected, rel=1e-4)


def test_recon_metrics_and_bad_shapes() -> None:
    x = _images()
    m = recon_metrics(x + 0.1, x)
    assert set(m) == {"psnr", "ssim"} and m["psnr"] == pytest.approx(26.0206, abs=1e-3)
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, x[:2])


def test_recon_score_streamed_equals_the_whole_set() -> None:
    from components.evaluation.evaluator import Evaluator, EvaluatorConfig
    from components.evaluation.frechet import feature_stats

    torch.manual_seed(0)
    net = Evaluator(EvaluatorConfig(widths=(8,), feature_dim=8), in_channels=1, num_classes=3).eval()
    x = _images(n=37)
    x_rec = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    score = ReconScore(net, keep=10)
    for a, b in zip(x.split(8), x_rec.split(8), strict=True):  # 4 batches of 8 and one of 5
        score.update(a, b)
    whole = recon_metrics(x_rec, x)
    got = score.metrics()
    assert got["psnr"] == pytest.approx(whole["psnr"], rel=1e-5)
    assert got["ssim"] == pytest.approx(whole["ssim"], rel=1e-5)
    assert got["l1"] == pytest.approx(float((x_rec - x).abs().mean()), rel=1e-5)
    stats, ref = score.stats(), feature_stats(net, x_rec)
    assert stats.n == 37 and torch.allclose(stats.mu, ref.mu.double(), atol=1e-5)
    torch.testing.assert_close(stats.sigma, ref.sigma.double(), rtol=1e-4, atol=1e-6)
    originals, recons = score.pairs()
    assert torch.equal(originals, x[:10]) and torch.equal(recons, x_rec[:10])
    with pytest.raises(ValueError, match="no reconstructions"):
        ReconScore().metrics()
