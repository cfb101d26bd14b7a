"""Preconditioners, noise-level distributions and the loss against the papers' closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.diffusion.config import DiffusionConfig
from components.diffusion.loss import denoising_loss, drop_labels
from components.diffusion.noise import loss_weight, sample_sigma
from components.diffusion.precond import PRECONDITIONERS, build_denoiser

torch.set_num_threads(1)

TINY = {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": ()}
OBJECTIVES = {
    "ddpm_eps": {"objective": "ddpm"},
    "ddpm_v": {"objective": "ddpm", "prediction": "v"},
    "ddpm_cosine": {"objective": "ddpm", "beta_schedule": "cosine"},
    "ve": {"objective": "ve"},
    "edm": {"objective": "edm"},
    "flow": {"objective": "flow"},
}


def _config(name: str, **backbone) -> DiffusionConfig:
    return DiffusionConfig(**OBJECTIVES[name], backbone={**TINY, **backbone})


def _alphas_cumprod(schedule: str, T: int = 1000) -> torch.Tensor:
    """Independent of the code under test: Ho et al. eq. 4 and iDDPM eq. 17 in float64."""
    if schedule == "linear":
        return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    f = [math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = torch.tensor([min(1 - f[t + 1] / f[t], 0.999) for t in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class _Const(nn.Module):
    """A stand-in backbone returning a fixed output F, whatever its inputs."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out
        self.config = type("C", (), {"num_classes": 0})()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.out


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_sigma_to_zero_gives_the_identity(name: str) -> None:
    torch.manual_seed(0)
    denoiser = build_denoiser(_config(name)).eval()
    nn.init.normal_(denoiser.net.out.weight, std=0.5)  # a zero output layer would hide c_skip/c_out errors
    nn.init.normal_(denoiser.net.out.bias, std=0.5)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        near_zero = denoiser(x, torch.full((3,), 1e-5))
        noisy = denoiser(x, 1.0)
    assert torch.allclose(near_zero, x, atol=1e-3)
    assert (noisy - x).abs().max() > 0.05  # the network does contribute away from sigma = 0


def test_unknown_objective_lists_the_valid_ones() -> None:
    cfg = DiffusionConfig().model_copy(update={"objective": "score"})  # bypasses validation on purpose
    with pytest.raises(ValueError, match="unknown objective 'score'; valid: ddpm, edm, flow, ve"):
        build_denoiser(cfg)
    assert set(PRECONDITIONERS) == {"ddpm", "ve", "edm", "flow"}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_marginal_matches_closed_form(schedule: str) -> None:
    """s(sigma) (x0 + sigma n) == sqrt(abar_t) x0 + sqrt(1 - abar_t) n (Ho et al. eq. 4)."""
    denoiser = build_denoiser(DiffusionConfig(objective="ddpm", beta_schedule=schedule, backbone=TINY))
    abar = _alphas_cumprod(schedule)
    t = torch.tensor([0, 10, 250, 500, 999])
    sigma = denoiser.sigmas[t]
    x0, n = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    ours = denoiser.scale(sigma.double()).reshape(-1, 1, 1, 1) * (
        x0 + sigma.double().reshape(-1, 1, 1, 1) * n
    )
    a = abar[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(ours, a.sqrt() * x0 + (1 - a).sqrt() * n, rtol=1e-4, atol=1e-5)
    assert torch.equal(denoiser.sigma_to_t(sigma), t.float())  # exact on the table
    frac = torch.tensor([0.25, 17.5, 998.9])
    assert torch.allclose(denoiser.sigma_to_t(denoiser.t_to_sigma(frac)), frac, atol=1e-3)


def test_flow_marginal_matches_closed_form() -> None:
    """s(sigma) (x0 + sigma n) == (1 - t) x0 + t n with sigma = t / (1 - t)."""
    denoiser = build_denoiser(_config("flow"))
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999])
    sigma = denoiser.t_to_sigma(t)
    x0, n = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    ours = denoiser.scale(sigma).reshape(-1, 1, 1, 1) * (x0 + sigma.reshape(-1, 1, 1, 1) * n)
    tt = t.reshape(-1, 1, 1, 1)
    assert torch.allclose(ours, (1 - tt) * x0 + tt * n, atol=1e-5)
    assert torch.allclose(denoiser.sigma_to_t(sigma), t)


def test_edm_coefficients_are_table_1() -> None:
    denoiser = build_denoiser(_config("edm"))
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = denoiser.coefficients(sigma)
    assert torch.allclose(c_skip, 0.25 / (sigma**2 + 0.25))
    assert torch.allclose(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(c_in, 1 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)


def test_eps_and_v_prediction_give_the_same_denoiser() -> None:
    """A v-network whose output is the eps-network's converted (v = (eps - sqrt(1-abar) x_t)/sqrt(abar))."""
    abar = _alphas_cumprod("linear").float()
    t = torch.tensor([3, 100, 600, 990])
    a = abar[t].reshape(-1, 1, 1, 1)
    eps = torch.randn(4, 1, 8, 8)
    eps_model = build_denoiser(DiffusionConfig(objective="ddpm"), net=_Const(eps))
    sigma = eps_model.sigmas[t]
    x = torch.randn(4, 1, 8, 8) * (1 + sigma.reshape(-1, 1, 1, 1))  # x = x0 + sigma n, unscaled
    x_t = x * a.sqrt()  # what the network sees: c_in x
    v = (eps - (1 - a).sqrt() * x_t) / a.sqrt()
    v_model = build_denoiser(DiffusionConfig(objective="ddpm", prediction="v"), net=_Const(v))
    D_eps, D_v = eps_model(x, sigma), v_model(x, sigma)
    assert torch.allclose(D_eps, D_v, atol=1e-4 * float(x.abs().max()))
    assert torch.allclose(D_eps, (x_t - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-3)  # Ho et al. eq. 15


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_weight_is_inverse_c_out_squared(name: str) -> None:
    cfg = _config(name)
    sigma = torch.tensor([0.02, 0.3, 1.0, 7.0, 60.0])
    c_out = build_denoiser(cfg).coefficients(sigma)[1]
    assert torch.allclose(loss_weight(sigma, config=cfg), 1 / c_out**2, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_is_the_papers_own_form(name: str) -> None:
    cfg = _config(name)
    F = torch.randn(4, 1, 8, 8)
    denoiser = build_denoiser(cfg, net=_Const(F))
    if cfg.objective == "ddpm":
        t = torch.tensor([5, 200, 500, 900])
        sigma = denoiser.sigmas[t]
        a = _alphas_cumprod(cfg.beta_schedule)[t].float().reshape(-1, 1, 1, 1)
    else:
        sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    x0, n = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    loss, diag = denoising_loss(denoiser, x0, sigma, n, None, config=cfg)
    s = sigma.reshape(-1, 1, 1, 1)
    if name.startswith("ddpm") and cfg.prediction == "eps":
        target = n  # L_simple (Ho et al. eq. 14)
    elif name == "ddpm_v":
        target = a.sqrt() * n - (1 - a).sqrt() * x0  # Salimans & Ho, v
    elif name == "flow":
        target = n - x0  # velocity of x_t = (1 - t) x0 + t n
    elif name == "ve":
        target = -n  # D = x + sigma F
    else:  # edm: F_target of eq. 8, (x0 - c_skip x) / c_out
        sd = cfg.sigma_data
        x = x0 + s * n
        target = (x0 - sd**2 / (s**2 + sd**2) * x) / (s * sd / (s**2 + sd**2).sqrt())
    expected = (F - target).pow(2).flatten(1).mean(1)
    assert loss.shape == (4,)
    assert torch.allclose(loss, expected, rtol=1e-3, atol=1e-4)
    assert not diag["denoise_mse"].requires_grad


@pytest.mark.parametrize("name", ["ddpm_eps", "ve", "edm", "flow_uniform", "flow_logit"])
def test_training_noise_levels_follow_their_distribution(name: str) -> None:
    cfg = {
        "ddpm_eps": DiffusionConfig(objective="ddpm"),
        "ve": DiffusionConfig(objective="ve"),
        "edm": DiffusionConfig(objective="edm"),
        "flow_uniform": DiffusionConfig(objective="flow"),
        "flow_logit": DiffusionConfig(objective="flow", t_distribution="logit_normal", t_mean=0.5, t_std=0.8),
    }[name]
    n = 40_000
    sigma = sample_sigma(n, config=cfg, generator=torch.Generator().manual_seed(0))
    again = sample_sigma(n, config=cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sigma, again) and sigma.shape == (n,) and (sigma > 0).all()
    se = 5 / n**0.5  # five standard errors of a unit-variance mean
    if name == "ddpm_eps":
        table = build_denoiser(DiffusionConfig(objective="ddpm", backbone=TINY)).sigmas
        t = torch.searchsorted(table, sigma)
        assert torch.equal(table[t], sigma)  # only table values
        assert abs(t.float().mean() - 499.5) < 289 * se  # uniform on 0..999
    elif name == "ve":
        u = (sigma.log() - math.log(0.02)) / (math.log(100) - math.log(0.02))
        assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.29 * se
    elif name == "edm":
        assert abs(sigma.log().mean() + 1.2) < 1.2 * se and abs(sigma.log().std() - 1.2) < 0.02
    elif name == "flow_uniform":
        t = sigma / (1 + sigma)
        assert abs(t.mean() - 0.5) < 0.29 * se and abs(t.var() - 1 / 12) < 0.003
    else:
        logit = sigma.log()  # logit(t) = log(sigma)
        assert abs(logit.mean() - 0.5) < 0.8 * se and abs(logit.std() - 0.8) < 0.02


def test_drop_labels_rate_and_unlabelled() -> None:
    labels = torch.arange(10).repeat(1000)
    dropped = drop_labels(labels, rate=0.2, num_classes=10, generator=torch.Generator().manual_seed(0))
    share = (dropped == 10).float().mean()
    assert abs(share - 0.2) < 0.02
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    unlabelled = drop_labels(torch.tensor([-1, 3]), rate=0.0, num_classes=10)
    assert unlabelled.tolist() == [10, 3]
    with pytest.raises(ValueError, match="rate=1.0"):
        drop_labels(labels, rate=1.0, num_classes=10)
