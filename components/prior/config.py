"""Config of the token priors: GPT (Esser et al. 2021, sec. 3.2) and MaskGIT (Chang et al. 2022).

`PriorConfig` is the `model` block of a prior stage and part of the exported config.json;
`PriorSamplingConfig` holds the sampling knobs, which the exported generator offers as options.
Defaults are the papers' where they give one (GPT-2 small for the GPT, MaskGIT's 8 steps, cosine
schedule and choice temperature 4.5); params.yaml sets a small model for the digits pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from components.sampling_limits import limited
from components.schema import StrictConfig

PriorKind = Literal["gpt", "maskgit"]
MaskSchedule = Literal["cosine", "linear", "square"]


class TransformerConfig(StrictConfig):
    """Size of a pre-norm transformer (nanoGPT's GPT-2 small by default)."""

    layers: int = Field(default=12, ge=1)
    heads: int = Field(default=12, ge=1)
    width: int = Field(default=768, ge=8, description="embedding width; a multiple of heads")
    mlp_ratio: int = Field(default=4, ge=1)  # hidden width of the MLP / width, as in GPT-2
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerConfig:
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is not divisible by heads={self.heads}; pick width a multiple of heads"
            )
        return self


class GPTConfig(TransformerConfig):
    """Decoder-only transformer with causal attention, trained on next-token prediction."""


class MaskGITConfig(TransformerConfig):
    """Bidirectional transformer trained to fill masked tokens (MaskGIT: 24 layers, 16 heads, 768 wide)."""

    mask_schedule: MaskSchedule = "cosine"  # the paper's best (sec. 3.3, table 3)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)  # MaskGIT trains with dropout 0.1


class PriorConfig(StrictConfig):
    """Which prior (`kind`) and its architecture; the block of the other kind is ignored."""

    kind: PriorKind = "gpt"
    gpt: GPTConfig = GPTConfig()
    maskgit: MaskGITConfig = MaskGITConfig()
    label_dropout: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="share of labels replaced by the null class (CFG)"
    )  # Ho & Salimans 2022 drop 10-20% of labels

    @property
    def model(self) -> GPTConfig | MaskGITConfig:
        """The architecture `kind` selects."""
        return self.gpt if self.kind == "gpt" else self.maskgit


class PriorSamplingConfig(StrictConfig):
    """Sampling knobs; `steps` and `choice_temperature` are MaskGIT's, `use_cache` is GPT's."""

    temperature: Annotated[float, limited("temperature")] = 1.0
    top_k: Annotated[int | None, limited("top_k")] = Field(default=None, description="None or 0: off")
    top_p: Annotated[float, limited("top_p")] = Field(
        default=1.0, description="nucleus mass in (0, 1]; 1: off"
    )
    guidance: Annotated[float, limited("guidance")] = Field(
        default=1.0, description="CFG scale w; 1: plain conditional, 0: unconditional"
    )
    steps: Annotated[int, limited("steps")] = 8  # MaskGIT decodes 256 tokens in 8 steps (sec. 4.2)
    choice_temperature: Annotated[float, limited("choice_temperature")] = (
        4.5  # MaskGIT's reference code; annealed to 0
    )
    use_cache: bool = True  # GPT: KV cache (same samples, fewer FLOPs)

    def options(self, kind: PriorKind) -> dict[str, Any]:
        """The sampling options a generator of `kind` offers, with these values as defaults."""
        names = ["temperature", "top_k", "top_p", "guidance"]
        names += ["use_cache"] if kind == "gpt" else ["steps", "choice_temperature"]
        return {name: getattr(self, name) for name in names}


def one_line(err: ValidationError, *, prefix: str = "") -> str:
    """The first error of `err` as `key=value: rule` (pydantic's own message spans several lines)."""
    first = err.errors()[0]
    key = prefix + ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}={first.get('input')!r}: {first['msg'].removeprefix('Value error, ')}"


def sampling_config(options: Mapping[str, Any]) -> PriorSamplingConfig:
    """Validate sampling options; a bad value is a one-line ValueError naming key, value and rule."""
    try:
        return PriorSamplingConfig(**options)
    except ValidationError as err:
        raise ValueError(one_line(err)) from None
