"""Configs of the EDM-style diffusion framework (Karras et al. 2022, "Elucidating the Design Space").

`DiffusionConfig` picks the objective (Table 1's columns: VP/DDPM, VE, EDM, plus flow matching,
Lipman et al. 2023 / Liu et al. 2023) and its training knobs; `SamplingConfig` picks the sampler
(Algorithm 1/2 of EDM, DDPM ancestral, DDIM) and its time discretization. Which pairs work is one
table, `VALID_SAMPLING`, checked by `check_sampling` and by `DiffusionStageConfig` at params load.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from components.diffusion.discretization import default_sigma_range, sigma_bounds
from components.nn.unet import UNetConfig
from components.sampling_limits import limited
from components.schema import StrictConfig

Objective = Literal["ddpm", "ve", "edm", "flow"]
Sampler = Literal["ddpm", "ddim", "euler", "heun"]
Discretization = Literal["karras", "leading", "trailing", "linspace"]

#: objective -> sampler -> discretizations it may run on. Every sampler works in EDM's sigma space
#: (x = x0 + sigma * n); "leading"/"trailing"/"linspace" are the objective's own timesteps (DDPM:
#: its discrete table, flow: t on a uniform grid), "karras" is EDM's rho-schedule in sigma (eq. 5).
#: DDPM ancestral needs the discrete posterior of its own Markov chain; DDIM (Song et al. 2021) is
#: defined on the VP timesteps and, being exact for any affine x_t = a*x0 + b*eps path, on flow's t;
#: Euler and Heun integrate the probability-flow ODE and take any sigma grid.
VALID_SAMPLING: dict[str, dict[str, tuple[str, ...]]] = {
    "ddpm": {
        "ddpm": ("leading", "trailing", "linspace"),
        "ddim": ("leading", "trailing", "linspace"),
        "euler": ("karras", "leading", "trailing", "linspace"),
        "heun": ("karras", "leading", "trailing", "linspace"),
    },
    "ve": {"euler": ("karras",), "heun": ("karras",)},
    "edm": {"euler": ("karras",), "heun": ("karras",)},
    "flow": {"ddim": ("linspace",), "euler": ("linspace", "karras"), "heun": ("linspace", "karras")},
}


class DiffusionConfig(StrictConfig):
    """The objective: preconditioner, training noise levels and loss weight; knobs of others are ignored."""

    objective: Objective = "edm"
    # ddpm (Ho et al. 2020; cosine: Nichol & Dhariwal 2021; v: Salimans & Ho 2022)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = Field(default=1000, ge=2)  # T of DDPM
    prediction: Literal["eps", "v"] = "eps"
    # edm (Table 1, "ours")
    sigma_data: float = Field(default=0.5, gt=0)
    p_mean: float = -1.2
    p_std: float = Field(default=1.2, gt=0)
    # ve (Song et al. 2021, EDM's VE column): log-uniform training sigma in [sigma_min, sigma_max]
    sigma_min: float = Field(default=0.02, gt=0)
    sigma_max: float = Field(default=100.0, gt=0)
    # flow (rectified flow / flow matching): t ~ U(0, 1) or logit-normal (Esser et al. 2024, SD3)
    t_distribution: Literal["uniform", "logit_normal"] = "uniform"
    t_mean: float = 0.0  # SD3's logit-normal m = 0, s = 1
    t_std: float = Field(default=1.0, gt=0)
    label_dropout: float = Field(default=0.1, ge=0, lt=1, description="CFG: share of labels dropped")
    backbone: UNetConfig = UNetConfig()

    @model_validator(mode="after")
    def _ranges(self) -> DiffusionConfig:
        if self.objective == "ve" and self.sigma_min >= self.sigma_max:
            raise ValueError(f"ve: sigma_min={self.sigma_min} must be below sigma_max={self.sigma_max}")
        return self


class SamplingConfig(StrictConfig):
    """How to sample: sampler, steps, discretization, guidance and the samplers' knobs."""

    sampler: Sampler = "heun"
    steps: Annotated[int, limited("steps")] = Field(
        default=18, description="sampler iterations; sigmas has steps + 1 entries"
    )
    discretization: Discretization = "karras"
    rho: Annotated[float, limited("rho")] = 7.0  # EDM eq. 5
    guidance: Annotated[float, limited("guidance")] = Field(
        default=1.0, description="CFG weight w: 1 conditional, 0 unconditional"
    )
    guidance_interval: Annotated[tuple[float, float] | None, limited("guidance_interval")] = Field(
        default=None, description="(sigma_lo, sigma_hi]: guide only at these noise levels; null: at all"
    )  # Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"
    eta: Annotated[float, limited("eta")] = Field(
        default=0.0, description="ddim only: 0 deterministic, 1 DDPM-like"
    )
    S_churn: Annotated[float, limited("S_churn")] = 0.0  # heun only (EDM Algorithm 2); 0: deterministic
    S_tmin: Annotated[float, limited("S_tmin")] = 0.0
    S_tmax: Annotated[float | None, limited("S_tmax")] = Field(
        default=None, description="null: no upper bound (EDM's inf)"
    )
    S_noise: Annotated[float, limited("S_noise")] = 1.0
    sigma_min: Annotated[float | None, limited("sigma_min")] = Field(
        default=None, description="karras only; null: per objective"
    )
    sigma_max: Annotated[float | None, limited("sigma_max")] = Field(
        default=None, description="karras only; null: per objective"
    )

    @model_validator(mode="after")
    def _own_knobs(self) -> SamplingConfig:
        if self.eta > 0 and self.sampler != "ddim":
            raise ValueError(f"eta={self.eta} applies to sampler=ddim only, not sampler={self.sampler}")
        if self.S_churn > 0 and self.sampler != "heun":
            raise ValueError(
                f"S_churn={self.S_churn} applies to sampler=heun only, not sampler={self.sampler}"
            )
        if self.discretization != "karras" and (self.sigma_min, self.sigma_max) != (None, None):
            raise ValueError(
                f"sigma_min/sigma_max apply to discretization=karras only, not {self.discretization}"
            )
        if (
            self.guidance_interval is not None
            and not 0 <= self.guidance_interval[0] < self.guidance_interval[1]
        ):
            raise ValueError(
                f"guidance_interval={list(self.guidance_interval)} must be [sigma_lo, sigma_hi] with 0 <= lo < hi"
            )
        lo, hi = self.sigma_min, self.sigma_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"sigma_min={lo} must be below sigma_max={hi}")
        if self.S_tmax is not None and self.S_tmin > self.S_tmax:
            raise ValueError(f"S_tmin={self.S_tmin} must not exceed S_tmax={self.S_tmax}")
        return self


def check_sampling(model: DiffusionConfig, sampling: SamplingConfig) -> None:
    """Raise ValueError (one line) when `sampling` cannot run on a model trained with `model`."""
    objective, sampler, disc = model.objective, sampling.sampler, sampling.discretization
    table = VALID_SAMPLING[objective]
    if disc not in table.get(sampler, ()):
        valid = "; ".join(f"{s}: {'/'.join(d)}" for s, d in table.items())
        raise ValueError(
            f"objective={objective} cannot sample with sampler={sampler}, discretization={disc}; "
            f"valid for {objective}: {valid}"
        )
    if disc in ("leading", "trailing") and sampling.steps > model.num_timesteps:
        raise ValueError(
            f"steps={sampling.steps} exceeds the objective's num_timesteps={model.num_timesteps}"
        )
    if disc == "linspace" and objective == "ddpm" and sampling.steps > model.num_timesteps:
        raise ValueError(
            f"steps={sampling.steps} exceeds the objective's num_timesteps={model.num_timesteps}"
        )
    if disc == "karras":
        lo, hi = default_sigma_range(model)
        lo = sampling.sigma_min if sampling.sigma_min is not None else lo
        hi = sampling.sigma_max if sampling.sigma_max is not None else hi
        low_bound, high_bound = sigma_bounds(model)
        if not low_bound <= lo < hi <= high_bound:
            raise ValueError(
                f"karras sigma range [{lo:g}, {hi:g}] must be increasing and lie within "
                f"{objective}'s [{low_bound:g}, {high_bound:g}]"
            )


def nfe(sampling: SamplingConfig) -> int:
    """Network evaluations per sample: one D(x; sigma) call counts once, guided or not.

    Convention (EDM, Table 2): Heun takes two evaluations per step except the last step to sigma = 0,
    which is Euler: 2 * steps - 1 (18 steps = 35 NFE). The other samplers take one per step. With
    guidance != 1 each evaluation runs the network once on a batch of 2B (conditional and empty
    class together), so compute doubles while NFE, counted per sample as in EDM, does not.
    """
    return 2 * sampling.steps - 1 if sampling.sampler == "heun" else sampling.steps


class DiffusionStageConfig(StrictConfig):
    """A stage's diffusion blocks: the model and its default sampling, refused together if invalid.

    Stage configs (e.g. `train_diffusion`) subclass this and add their own fields (loop, ...).
    """

    model: DiffusionConfig = DiffusionConfig()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _valid_pair(self) -> DiffusionStageConfig:
        check_sampling(self.model, self.sampling)
        return self
