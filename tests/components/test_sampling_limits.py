"""The one table of sampling limits: every option finite and in range, caps from the environment,
seeds in [0, 2**63 - 1], and the family configs typed by the same table."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.diffusion.config import SamplingConfig
from components.prior.config import PriorSamplingConfig
from components.sampling_limits import (
    CAPS,
    LIMITS,
    MAX_SEED,
    cap,
    check_cap,
    check_option,
    check_seed,
)
from components.zoo.families import GANSamplingConfig, TemperatureSamplingConfig

HOSTILE = [math.inf, -math.inf, math.nan, 1e30, -1e30, 10**400, True, "1", [1.0]]


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_every_option_refuses_hostile_values_in_one_line_naming_it_and_its_range(name):
    rule = LIMITS[name].rule()
    assert "[" in rule or "(" in rule  # the range is spelled out
    for value in HOSTILE:
        if LIMITS[name].kind is tuple:
            value = [0.1, value]  # a pair with one bad end
        with pytest.raises(ValueError) as info:
            check_option(name, value)
        assert str(info.value) == f"{name}={value!r}: {rule}"


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("guidance", [0, 1, 7.5, 50], [-0.1, 50.5]),
        ("temperature", [1e-3, 1, 10], [0, -1, 10.01]),
        ("top_p", [1e-6, 1.0], [0.0, 1.01]),
        ("top_k", [None, 0, 5, 65536], [-1, 65537, 2.5]),
        ("steps", [1, 18, 1000, 3.0], [0, 1001, 2.5]),
        ("eta", [0, 1], [1.5]),
        ("truncation", [None, 0.5, 10], [0, -1]),
        ("guidance_interval", [None, [0, 2], (0.2, 1e4)], [[1], [0, 2e4], [-1, 1]]),
    ],
)
def test_ranges_include_their_ends_as_documented(name, good, bad):
    for value in good:
        check_option(name, value)
    for value in bad:
        with pytest.raises(ValueError, match=f"^{name}="):
            check_option(name, value)


def test_values_come_back_as_the_options_kind():
    assert check_option("steps", 4.0) == 4 and isinstance(check_option("steps", 4.0), int)
    assert check_option("guidance", 2) == 2.0 and isinstance(check_option("guidance", 2), float)
    assert check_option("guidance_interval", [0, 2]) == (0.0, 2.0)
    assert check_option("sampler", "euler") == "euler"  # a choice: the family config types it


def test_caps_come_from_the_environment_and_refuse_bad_settings(monkeypatch):
    assert {name: cap(name) for name in CAPS} == {"images": 1024, "steps": 1000, "rows": 512}
    with pytest.raises(
        ValueError, match=r"^n=2000 exceeds the cap of 1024 images per call \(set GENPIPE_MAX_IMAGES"
    ):
        check_cap("images", 2000, what="n")
    monkeypatch.setenv("GENPIPE_MAX_STEPS", "5")
    assert check_option("steps", 5) == 5
    with pytest.raises(
        ValueError, match=r"^steps=6: must be an integer in \[1, 5\] \(GENPIPE_MAX_STEPS raises"
    ):
        check_option("steps", 6)
    for bad in ("0", "-3", "ten", "1e3"):
        monkeypatch.setenv("GENPIPE_MAX_ROWS", bad)
        with pytest.raises(ValueError, match=f"^GENPIPE_MAX_ROWS='{bad}' must be a positive integer"):
            cap("rows")


def test_seeds_span_what_torch_accepts_and_nothing_more():
    for seed in (0, 1, MAX_SEED):
        assert check_seed(seed) == seed
        torch.Generator().manual_seed(seed)  # the whole range is a valid torch seed
    for bad in (-1, 2**63, 2**64, 2**70, 1.5, True, "3"):
        with pytest.raises(ValueError) as info:
            check_seed(bad, what="--seed")
        assert str(info.value) == f"--seed={bad!r} must be an integer in [0, 2**63 - 1 = {MAX_SEED}]"


@pytest.mark.parametrize(
    "config", [SamplingConfig, PriorSamplingConfig, TemperatureSamplingConfig, GANSamplingConfig]
)
def test_family_configs_take_their_numeric_fields_from_the_table(config):
    """One source: a config field named like an option refuses exactly what the table refuses."""
    fields = [name for name in config.model_fields if name in LIMITS]
    assert fields
    for name in fields:
        value = [0, math.inf] if LIMITS[name].kind is tuple else math.inf
        with pytest.raises(ValidationError) as info:
            config(**{name: value})
        assert LIMITS[name].rule() in str(info.value)
    numeric = {
        name
        for name, field in config.model_fields.items()
        if any(t in str(field.annotation) for t in ("int", "float"))
    }
    assert numeric <= set(LIMITS), f"{config.__name__}: numeric fields without a shared limit"
