"""Every params.yaml section as a validated config; a stage config composes component configs.

Unknown keys, wrong types and out-of-range values fail at load, before any compute, with one line
naming the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from components.data.config import PrepareConfig
from components.schema import StrictConfig
from components.stages import (
    EncodeConfig,
    EvaluateConfig,
    TrainDiffusionConfig,
    TrainEvaluatorConfig,
    TrainPriorConfig,
    TrainTokenizerConfig,
    TrainZooConfig,
)
from components.training.config import TrainConfig


class ParamsError(ValueError):
    """A params file that does not validate; the message is one line naming key, value and rule."""


class RayConfig(StrictConfig):
    """The `ray` section: how the driver starts or joins Ray (RAY_ADDRESS overrides `address`)."""

    address: str | None = None  # None: RAY_ADDRESS, else a local instance
    num_cpus: int | None = Field(default=None, ge=1)  # local instance only; None: all cores
    num_gpus: int | None = Field(default=None, ge=0)
    include_dashboard: bool = False


class MlflowConfig(StrictConfig):
    """The `mlflow` section (MLFLOW_TRACKING_URI overrides `tracking_uri`)."""

    tracking_uri: str | None = None  # None: sqlite:///<repo>/mlflow.db, artifacts in <repo>/mlartifacts
    experiment: str = Field(default="genpipe", min_length=1)
    register_models: bool = True


SHARED_SECTIONS: dict[str, type[StrictConfig]] = {
    "train": TrainConfig,
    "ray": RayConfig,
    "mlflow": MlflowConfig,
}

#: Stage name -> config of its own section.
STAGE_SECTIONS: dict[str, type[StrictConfig]] = {
    "prepare": PrepareConfig,
    "train_evaluator": TrainEvaluatorConfig,
    "train_tokenizer": TrainTokenizerConfig,
    "encode": EncodeConfig,
    "train_diffusion": TrainDiffusionConfig,
    "train_prior": TrainPriorConfig,
    "train_zoo": TrainZooConfig,
    "evaluate": EvaluateConfig,
}


def _one_line(section: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    key = f"{section}.{loc}" if loc else section
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key (allowed here: {_allowed(err, first['loc'])})"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{key}={value!r}: {msg}"


def _allowed(err: ValidationError, loc: tuple) -> str:
    model = err.title
    cls = next(
        (c for c in (*STAGE_SECTIONS.values(), *SHARED_SECTIONS.values()) if c.__name__ == model), None
    )
    for part in loc[:-1]:
        if cls is None:
            break
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        cls = ann if isinstance(ann, type) and issubclass(ann, StrictConfig) else None
    return ", ".join(sorted(cls.model_fields)) if cls else "see params.yaml"


def validate_section(name: str, raw: Any) -> StrictConfig:
    """Validate one section; raise ParamsError with a one-line message."""
    models = {**SHARED_SECTIONS, **STAGE_SECTIONS}
    if name not in models:
        raise ParamsError(f"unknown params section {name!r}; valid: {sorted(models)}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{name}: must be a mapping, got {type(raw).__name__}")
    try:
        return models[name].model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_one_line(name, err)) from None


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a params file as a dict, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return raw


def load_stage(path: str | Path, stage: str) -> dict[str, StrictConfig]:
    """The stage's own section plus the shared sections, validated."""
    raw = read_params(path)
    if stage not in STAGE_SECTIONS:
        raise ParamsError(f"unknown stage {stage!r}; valid: {sorted(STAGE_SECTIONS)}")
    out = {name: validate_section(name, raw.get(name)) for name in SHARED_SECTIONS}
    out[stage] = validate_section(stage, raw.get(stage))
    return out


def validate_all(path: str | Path) -> dict[str, StrictConfig]:
    """Validate every section of a params file; unknown sections are errors."""
    raw = read_params(path)
    return {name: validate_section(name, value) for name, value in raw.items()}
