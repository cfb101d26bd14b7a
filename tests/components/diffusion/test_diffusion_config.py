"""Diffusion configs: the validity table, one-line refusals of bad pairs and knobs, NFE, schedules."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.diffusion.config import (
    VALID_SAMPLING,
    DiffusionConfig,
    DiffusionStageConfig,
    SamplingConfig,
    check_sampling,
    nfe,
)
from components.diffusion.discretization import (
    ddpm_sigmas,
    karras_sigmas,
    sampling_sigmas,
    timestep_indices,
)

ALL_PAIRS = [
    (objective, sampler, disc)
    for objective in ("ddpm", "ve", "edm", "flow")
    for sampler in ("ddpm", "ddim", "euler", "heun")
    for disc in ("karras", "leading", "trailing", "linspace")
]


@pytest.mark.parametrize(("objective", "sampler", "disc"), ALL_PAIRS)
def test_check_sampling_follows_the_table(objective: str, sampler: str, disc: str) -> None:
    model, sampling = (
        DiffusionConfig(objective=objective),
        SamplingConfig(sampler=sampler, discretization=disc),
    )
    if disc in VALID_SAMPLING[objective].get(sampler, ()):
        check_sampling(model, sampling)
        sigmas = sampling_sigmas(model, sampling)
        assert sigmas.shape == (sampling.steps + 1,) and sigmas[-1] == 0
        assert (sigmas[:-1] > 0).all() and (sigmas.diff() < 0).all()
        return
    with pytest.raises(ValueError) as err:
        check_sampling(model, sampling)
    message = str(err.value)
    assert "\n" not in message
    assert f"objective={objective}" in message and f"sampler={sampler}" in message
    assert f"discretization={disc}" in message and "valid for" in message


def test_suggested_pairs_are_valid() -> None:
    assert VALID_SAMPLING["ddpm"]["ddpm"] == ("leading", "trailing", "linspace")
    assert set(VALID_SAMPLING["flow"]) == {"ddim", "euler", "heun"}
    assert all("ddpm" not in VALID_SAMPLING[o] for o in ("ve", "edm", "flow"))
    assert all("karras" in VALID_SAMPLING[o]["heun"] for o in ("ddpm", "ve", "edm", "flow"))


def test_stage_config_refuses_invalid_pairs_at_validation() -> None:
    ok = DiffusionStageConfig.model_validate(
        {"model": {"objective": "ddpm"}, "sampling": {"sampler": "ddpm", "discretization": "trailing"}}
    )
    assert ok.sampling.sampler == "ddpm"
    with pytest.raises(ValidationError, match="objective=edm cannot sample with sampler=ddpm"):
        DiffusionStageConfig.model_validate({"model": {"objective": "edm"}, "sampling": {"sampler": "ddpm"}})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "dpm"}, "sampler"),
        ({"discretization": "cosine"}, "discretization"),
        ({"steps": 0}, "steps"),
        ({"eta": 0.5}, "eta=0.5 applies to sampler=ddim only"),
        ({"S_churn": 10.0, "sampler": "euler"}, "S_churn=10.0 applies to sampler=heun only"),
        ({"discretization": "linspace", "sigma_min": 0.1}, "karras only"),
        ({"sigma_min": 10.0, "sigma_max": 1.0}, "sigma_min=10.0 must be below sigma_max=1.0"),
        ({"S_tmin": 5.0, "S_tmax": 1.0}, "S_tmin=5.0 must not exceed S_tmax=1.0"),
        ({"guidance": -1.0}, "guidance"),
        ({"typo": 1}, "typo"),
    ],
)
def test_bad_sampling_knobs_are_refused_in_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match) as err:
        SamplingConfig(**kwargs)
    assert len(err.value.errors()) == 1


def test_bad_model_knobs_are_refused() -> None:
    with pytest.raises(ValidationError, match="objective"):
        DiffusionConfig(objective="score")
    with pytest.raises(ValidationError, match="sigma_min=5.0 must be below sigma_max=1.0"):
        DiffusionConfig(objective="ve", sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValidationError, match="label_dropout"):
        DiffusionConfig(label_dropout=1.0)


def test_karras_range_outside_the_ddpm_table_is_refused() -> None:
    model = DiffusionConfig(objective="ddpm")  # linear: sigma in [0.01, 157]
    with pytest.raises(ValueError, match=r"karras sigma range \[0.002, 80\] .* within ddpm's \[0.01"):
        check_sampling(model, SamplingConfig(sigma_min=0.002))
    short = DiffusionConfig(objective="ddpm", num_timesteps=100)
    with pytest.raises(ValueError, match="steps=200 exceeds the objective's num_timesteps=100"):
        check_sampling(short, SamplingConfig(sampler="ddim", discretization="trailing", steps=200))


def test_nfe_convention() -> None:
    assert nfe(SamplingConfig()) == 35  # EDM: Heun, 18 steps
    assert nfe(SamplingConfig(sampler="euler", steps=18)) == 18
    assert nfe(SamplingConfig(sampler="heun", steps=18, guidance=3.0)) == 35  # per sample, guided or not
    assert nfe(SamplingConfig(sampler="ddpm", discretization="trailing", steps=50)) == 50


def test_timestep_spacings_match_lin_et_al_table() -> None:
    # Lin et al. 2024, Table 2: T = 1000, 10 steps.
    assert timestep_indices(10, num_timesteps=1000, spacing="leading").tolist() == list(range(900, -1, -100))
    assert timestep_indices(10, num_timesteps=1000, spacing="trailing").tolist() == list(range(999, 0, -100))
    assert timestep_indices(10, num_timesteps=1000, spacing="linspace").tolist() == list(range(999, -1, -111))


def test_schedule_endpoints() -> None:
    linear = ddpm_sigmas(beta_schedule="linear", num_timesteps=1000)
    assert linear[0] == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5)  # alpha_bar_1 = 1 - beta_1
    assert 150 < linear[-1] < 160 and (linear.diff() > 0).all()
    cosine = ddpm_sigmas(beta_schedule="cosine", num_timesteps=1000)
    assert cosine[0] < linear[0] and (cosine.diff() > 0).all()
    k = karras_sigmas(18, sigma_min=0.002, sigma_max=80, rho=7)
    assert k[0] == pytest.approx(80) and k[-2] == pytest.approx(0.002) and k[-1] == 0
    # rho = 1 is a uniform grid in sigma
    assert torch.allclose(
        karras_sigmas(5, sigma_min=1, sigma_max=5, rho=1)[:-1], torch.arange(5.0, 0, -1).double()
    )
