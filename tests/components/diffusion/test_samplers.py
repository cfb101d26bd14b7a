"""Samplers against exact denoisers of Gaussian data: distribution, ODE accuracy, DDIM inversion, CFG.

For data N(mu, Sigma) the ideal denoiser is D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu) and
the probability-flow ODE's solution is x(0) = mu + Sigma^1/2 (Sigma + sigma_T^2)^-1/2 (x_T - mu).
"""

from __future__ import annotations

import pytest
import torch

from components.diffusion.config import VALID_SAMPLING, DiffusionConfig, SamplingConfig
from components.diffusion.discretization import karras_sigmas, sampling_sigmas
from components.diffusion.samplers import (
    SAMPLERS,
    ddim,
    ddim_invert,
    euler,
    guidance_in_interval,
    guided,
    heun,
    sample,
)

torch.set_num_threads(1)

MU = torch.tensor([0.5, -0.3, 0.2])
_A = torch.tensor([[0.5, 0.1, 0.0], [0.1, 0.3, -0.1], [0.0, -0.1, 0.2]])
SIGMA = _A @ _A.T + 0.02 * torch.eye(3)  # eigenvalues ~0.03 .. 0.33: a correlated, anisotropic target


class Gaussian:
    """Exact D(x; sigma) of N(mu_c, Sigma) on (B, 3, 1, 1); class c shifts the mean (for CFG tests)."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor, *, num_classes: int = 0) -> None:
        self.mu, self.cov, self.num_classes = mu, cov, num_classes
        self.lam, self.Q = torch.linalg.eigh(cov)
        self.calls: list[int] = []

    def means(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        if labels is None:
            return self.mu.expand(batch, 3)
        shift = torch.where(labels[:, None] == self.num_classes, 0.0, labels[:, None].float() * 0.5)
        return self.mu + shift * torch.tensor([1.0, 0.0, 0.0])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.calls.append(x.shape[0])
        m = self.means(labels, x.shape[0])
        z = (x.reshape(-1, 3) - m) @ self.Q  # eigen-coordinates
        shrink = self.lam / (self.lam + sigma.reshape(-1, 1) ** 2)
        return (m + (shrink * z) @ self.Q.T).reshape(x.shape)


# steps per sampler: enough that the discretization bias stays below the tolerance
STEPS = {"ddpm": 1000, "ddim": 200, "euler": 200, "heun": 40}
CASES = [
    (objective, sampler, disc)
    for objective, table in VALID_SAMPLING.items()
    for sampler, discs in table.items()
    for disc in discs
]


@pytest.mark.parametrize(("objective", "sampler", "disc"), CASES)
def test_every_valid_pair_reproduces_the_gaussian(objective: str, sampler: str, disc: str) -> None:
    """Mean and covariance within 0.02 (sampling error ~0.004 with 8000 samples; bias < 0.01)."""
    steps = STEPS[sampler] if not (sampler == "ddpm" and disc == "leading") else 500
    sampling = SamplingConfig(sampler=sampler, discretization=disc, steps=steps)
    x = sample(
        Gaussian(MU, SIGMA),
        (8000, 3, 1, 1),
        model=DiffusionConfig(objective=objective),
        sampling=sampling,
        generator=torch.Generator().manual_seed(0),
    ).reshape(-1, 3)
    assert (x.mean(0) - MU).abs().max() < 0.02
    assert (x.T.cov() - SIGMA).abs().max() < 0.02


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(sampler="heun", steps=60, S_churn=10, S_tmin=0.05, S_tmax=50),
        SamplingConfig(sampler="ddim", discretization="trailing", steps=200, eta=0.5),
    ],
    ids=["heun_churn", "ddim_eta"],
)
def test_stochastic_variants_reproduce_the_gaussian(sampling: SamplingConfig) -> None:
    objective = "edm" if sampling.sampler == "heun" else "ddpm"
    x = sample(
        Gaussian(MU, SIGMA),
        (8000, 3, 1, 1),
        model=DiffusionConfig(objective=objective),
        sampling=sampling,
        generator=torch.Generator().manual_seed(1),
    ).reshape(-1, 3)
    assert (x.mean(0) - MU).abs().max() < 0.02
    assert (x.T.cov() - SIGMA).abs().max() < 0.02


def test_heun_18_matches_a_1000_step_euler_solve() -> None:
    g = Gaussian(MU, torch.diag(torch.tensor([0.25, 0.25, 0.25])))  # EDM's sigma_data = 0.5
    x_T = 80 * torch.randn(500, 3, 1, 1, generator=torch.Generator().manual_seed(2))
    fine = euler(g, x_T, karras_sigmas(1000, sigma_min=0.002, sigma_max=80).float())
    h18 = heun(g, x_T, karras_sigmas(18, sigma_min=0.002, sigma_max=80).float())
    e18 = euler(g, x_T, karras_sigmas(18, sigma_min=0.002, sigma_max=80).float())
    exact = MU.reshape(1, 3, 1, 1) + (0.25 / (0.25 + 80**2)) ** 0.5 * (x_T - MU.reshape(1, 3, 1, 1))
    rms = lambda a, b: (a - b).pow(2).mean().sqrt()  # noqa: E731
    assert rms(fine, exact) < 0.005  # the reference is converged
    assert rms(h18, fine) < 0.04  # against a sample spread of 0.5
    assert rms(h18, fine) < rms(e18, fine) / 2  # second order pays off at equal step count
    assert len(g.calls) == 1000 + 35 + 18  # Heun: 2 * 18 - 1 evaluations
    h36 = heun(g, x_T, karras_sigmas(36, sigma_min=0.002, sigma_max=80).float())
    assert rms(h36, exact) < rms(h18, exact) / 3  # error ~ h^2: doubling the steps quarters it


def test_ddim_is_deterministic_equals_euler_and_inverts() -> None:
    g = Gaussian(MU, SIGMA)
    model = DiffusionConfig(objective="ddpm")
    sigmas = sampling_sigmas(model, SamplingConfig(sampler="ddim", discretization="trailing", steps=100))
    x_T = sigmas[0] * torch.randn(256, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    a = ddim(g, x_T, sigmas, generator=torch.Generator().manual_seed(4))
    b = ddim(g, x_T, sigmas, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # eta = 0 draws nothing
    assert torch.allclose(a, euler(g, x_T, sigmas), atol=1e-5)  # DDIM is Euler in sigma space
    x0 = MU + torch.randn(256, 3, generator=torch.Generator().manual_seed(6)) @ _A.T
    x0 = x0.reshape(-1, 3, 1, 1)
    # Plain DDIM inversion is first order in the step; fixed-point refinement makes each step exact.
    for refine, tol in ((0, 0.5), (1, 0.05), (3, 1e-3)):
        encoded = ddim_invert(g, x0, sigmas, refine=refine)
        decoded = ddim(g, encoded, sigmas)
        assert (decoded - x0).abs().max() < tol, refine


def test_guidance_one_is_conditional_sampling_with_one_forward() -> None:
    g = Gaussian(MU, SIGMA, num_classes=3)
    labels = torch.tensor([0, 1, 2, 1])
    sigmas = karras_sigmas(10, sigma_min=0.002, sigma_max=80).float()
    x_T = 80 * torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    cond = heun(g, x_T, sigmas, labels=labels, guidance=1.0)
    assert g.calls and set(g.calls) == {4}  # B, not 2B
    plain = heun(lambda x, s, y: g(x, s, labels), x_T, sigmas)  # conditional denoiser, no CFG code path
    assert torch.equal(cond, plain)
    g.calls.clear()
    guided_x = heun(g, x_T, sigmas, labels=labels, guidance=3.0)
    assert set(g.calls) == {8}  # one batched forward of 2B
    # For Gaussians with a class-dependent mean, w = 3 extrapolates the mean: mu + 3 * shift.
    shift = (guided_x - plain).reshape(-1, 3)[:, 0]
    assert torch.allclose(shift, 2 * 0.5 * labels.float(), atol=0.05)


def test_guidance_interval_guides_only_inside_it() -> None:
    g = Gaussian(MU, SIGMA, num_classes=3)
    labels = torch.tensor([0, 1, 2, 1])
    sigmas = karras_sigmas(10, sigma_min=0.002, sigma_max=80).float()
    x_T = 80 * torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    full = heun(g, x_T, sigmas, labels=labels, guidance=3.0)
    assert torch.equal(
        heun(g, x_T, sigmas, labels=labels, guidance=guidance_in_interval(3.0, sigma_lo=0, sigma_hi=100)),
        full,
    )
    g.calls.clear()
    none = heun(g, x_T, sigmas, labels=labels, guidance=guidance_in_interval(3.0, sigma_lo=100, sigma_hi=200))
    assert set(g.calls) == {4} and torch.equal(none, heun(g, x_T, sigmas, labels=labels))  # never guided
    g.calls.clear()
    mid = heun(g, x_T, sigmas, labels=labels, guidance=guidance_in_interval(3.0, sigma_lo=0.3, sigma_hi=5.0))
    assert set(g.calls) == {4, 8}  # 2B forwards only at the guided levels
    assert not torch.equal(mid, full) and not torch.equal(mid, none)


def test_guidance_interval_in_sampling_config() -> None:
    from components.diffusion.config import SamplingConfig

    assert SamplingConfig(guidance=2.0, guidance_interval=(0.3, 5.0)).guidance_interval == (0.3, 5.0)
    with pytest.raises(ValueError, match=r"guidance_interval=\[5.0, 0.3\] must be"):
        SamplingConfig(guidance_interval=(5.0, 0.3))


def test_guided_uses_the_empty_class() -> None:
    g = Gaussian(MU, SIGMA, num_classes=3)
    x, sigma = torch.randn(2, 3, 1, 1), torch.tensor(1.0)
    out = guided(g, x, sigma, labels=torch.tensor([1, 2]), guidance=0.0)  # w = 0: unconditional
    assert torch.allclose(out, g(x, sigma.expand(2), torch.tensor([3, 3])))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("ddpm", {}, "ddpm draws noise: pass generator"),
        ("ddim", {"eta": 0.5}, "ddim with eta > 0 draws noise"),
        ("heun", {"S_churn": 5.0}, "heun with S_churn > 0 draws noise"),
    ],
)
def test_stochastic_samplers_require_a_generator(name: str, kwargs: dict, match: str) -> None:
    sigmas = karras_sigmas(4, sigma_min=0.1, sigma_max=10).float()
    with pytest.raises(ValueError, match=match):
        SAMPLERS[name](Gaussian(MU, SIGMA), torch.randn(2, 3, 1, 1), sigmas, **kwargs)


def test_same_generator_same_samples() -> None:
    model, sampling = (
        DiffusionConfig(objective="ddpm"),
        SamplingConfig(sampler="ddpm", discretization="trailing", steps=20),
    )
    runs = [
        sample(
            Gaussian(MU, SIGMA),
            (64, 3, 1, 1),
            model=model,
            sampling=sampling,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
