"""Every params.yaml section as a validated config; a stage config composes component configs.

Unknown keys, wrong types and out-of-range values fail at load, before any compute, with one line
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from components import catalog
from components.data.config import PrepareConfig
from components.diffusion.config import SamplingConfig
from components.prior.config import PriorSamplingConfig
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
from components.storage import StorageConfig
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
    "storage": StorageConfig,
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
    errors = err.errors()
    # A renamed key is both unknown and missing: name the unknown one, not the whole section.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in first["loc"])
    key = f"{section}.{loc}" if loc else section
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        allowed = _allowed(err, first["loc"])
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed.split(", "), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}: unknown key (allowed here: {allowed}){hint}"
    if first["type"] == "missing":
        return f"{key}: missing (required here)"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{key}={_short(value)}: {msg}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        config = models[name].model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_one_line(name, err)) from None
    if name in SECTION_CHECKS:
        SECTION_CHECKS[name](config)
    return config


def _prior_knobs(config: TrainPriorConfig) -> None:
    """A prior variant may set only the sampling knobs of its own kind (`steps` is MaskGIT's)."""
    for kind in ("gpt", "maskgit"):
        own = PriorSamplingConfig().options(kind)
        foreign = sorted(getattr(config, kind).sampling.model_fields_set - set(own))
        if foreign:
            raise ParamsError(
                f"train_prior.{kind}.sampling.{foreign[0]}: not a {kind} knob; "
                f"a {kind} prior samples with: {', '.join(sorted(own))}"
            )


def sampling_options(model: str) -> tuple[type[StrictConfig], tuple[str, ...]]:
    """(the sampling config, the option names) of the generator in models/<model>."""
    spec = catalog.model(model)
    if spec.recipe is not None:  # a train_zoo family: its recipe's sampling section
        config = catalog.recipe(spec).sampling
        return config, tuple(config.model_fields)
    if spec.stage == "train_prior":
        return PriorSamplingConfig, tuple(PriorSamplingConfig().options(spec.variant))  # type: ignore[arg-type]
    if spec.stage == "train_diffusion":
        return SamplingConfig, tuple(SamplingConfig.model_fields)
    raise ValueError(f"model {model!r} is not a generator: it has no sampling options")


def check_model_options(model: str, options: dict[str, Any], *, where: str) -> None:
    """Names and values of a model's sampling options, each against its field's type and the shared
    limits (components/sampling_limits.py); the loaded generator checks combinations."""
    config, names = sampling_options(model)
    for name, value in options.items():
        if name not in names:
            raise ParamsError(
                f"{where}.{name}: unknown sampling option for {model}; valid: {', '.join(sorted(names))}"
            )
        field = config.model_fields[name]
        typed = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        try:
            TypeAdapter(typed).validate_python(value)
        except ValidationError as err:
            msg = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise ParamsError(f"{where}.{name}={_short(value)}: {msg}") from None


def _evaluate_options(config: EvaluateConfig) -> None:
    for model, options in config.options.items():
        check_model_options(model, options, where=f"evaluate.options.{model}")


#: Checks across a validated section's fields that no single config holds.
SECTION_CHECKS = {"train_prior": _prior_knobs, "evaluate": _evaluate_options}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested mapping (lists are leaves): the dotted keys of `dvc exp run -S`,
    MLflow params and presets."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
