"""Prior configs: defaults validate, bad values and unknown keys fail with one line naming key and rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from components.prior.config import (
    GPTConfig,
    MaskGITConfig,
    PriorConfig,
    PriorSamplingConfig,
    one_line,
    sampling_config,
)


def test_defaults_and_kind_selects_the_architecture() -> None:
    cfg = PriorConfig()
    assert cfg.kind == "gpt" and cfg.model is cfg.gpt and cfg.label_dropout == 0.1
    mg = PriorConfig(kind="maskgit", maskgit={"layers": 2, "heads": 2, "width": 16})
    assert mg.model is mg.maskgit and mg.model.mask_schedule == "cosine"
    s = PriorSamplingConfig()
    assert (s.temperature, s.top_k, s.top_p, s.guidance, s.steps) == (1.0, None, 1.0, 1.0, 8)
    assert PriorConfig.model_validate(mg.model_dump(mode="json")) == mg


def test_options_per_kind() -> None:
    s = PriorSamplingConfig(guidance=2.0, steps=4)
    assert s.options("gpt") == {
        "temperature": 1.0,
        "top_k": None,
        "top_p": 1.0,
        "guidance": 2.0,
        "use_cache": True,
    }
    assert s.options("maskgit") == {
        "temperature": 1.0,
        "top_k": None,
        "top_p": 1.0,
        "guidance": 2.0,
        "steps": 4,
        "choice_temperature": 4.5,
    }


@pytest.mark.parametrize(
    ("model", "raw", "needles"),
    [
        (PriorSamplingConfig, {"top_p": 1.5}, ["top_p=1.5", "must be a finite number in (0, 1]"]),
        (PriorSamplingConfig, {"top_p": 0.0}, ["top_p=0.0", "(0, 1]"]),
        (PriorSamplingConfig, {"steps": 0}, ["steps=0", "must be an integer in [1, "]),
        (PriorSamplingConfig, {"top_k": -1}, ["top_k=-1", "must be null or an integer in [0, 65536]"]),
        (PriorSamplingConfig, {"temperature": 0}, ["temperature=0", "(0, 10]"]),
        (PriorSamplingConfig, {"guidance": -1.0}, ["guidance=-1.0"]),
        (PriorConfig, {"kind": "rnn"}, ["kind='rnn'", "'gpt' or 'maskgit'"]),
        (PriorConfig, {"label_dropout": 1.0}, ["label_dropout=1.0", "less than 1"]),
        (MaskGITConfig, {"mask_schedule": "exp"}, ["mask_schedule='exp'", "'cosine', 'linear' or 'square'"]),
        (GPTConfig, {"width": 30, "heads": 4}, ["width=30 is not divisible by heads=4"]),
        (PriorConfig, {"gpt": {"layer": 2}}, ["gpt.layer: unknown key"]),
    ],
)
def test_bad_values_fail_with_one_line(model, raw: dict, needles: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(raw)
    message = one_line(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_sampling_config_raises_one_line_value_error() -> None:
    with pytest.raises(ValueError, match=r"^top_p=2: must be a finite number in \(0, 1\]$"):
        sampling_config({"top_p": 2})
    assert sampling_config({"top_k": 5}).top_k == 5
