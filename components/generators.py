"""The generator interface: every family that makes images loads from its exported folder alone.

`models/<name>/config.json` names the `family` and holds every config needed to rebuild it;
`model.safetensors` holds the weights; a two-stage model carries the tokenizer it decodes with in
`models/<name>/tokenizer/` (a copy of the exported tokenizer folder). `load_generator` finds the
family by name through an explicit dict, so the evaluate stage, `genpipe sample` and the registry's
pyfunc models share one path. Nothing here imports ray, dvc or mlflow.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from components.catalog import GENERATORS, LOADERS
from components.io import atomic_dir, write_json

#: Exported folder name (models/<name>) -> registered model name, for every generator of the catalog.
MODELS: dict[str, str] = {m.name: m.registered for m in GENERATORS}

#: `family` in config.json -> module with `load(model_dir: Path, *, device) -> Generator`.
FAMILIES: dict[str, str] = dict(LOADERS)

TOKENIZER_DIR = "tokenizer"  # sub-folder of a two-stage model holding the tokenizer it decodes with


@runtime_checkable
class Generator(Protocol):
    """What every family's loaded generator offers."""

    num_classes: int  # 0: unconditional
    image_shape: tuple[int, int, int]  # (C, H, W)
    default_options: dict[str, Any]  # the family's sampling knobs with their trained defaults
    device: torch.device  # where its weights are: a caller's torch.Generator must be there too

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """`options` over the defaults, every name and value checked (one-line errors); samples nothing."""

    def sample(
        self, labels: torch.Tensor | int, *, generator: torch.Generator, **options: Any
    ) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] for int64 `labels` (n,), or `n` unconditional images."""


@runtime_checkable
class LikelihoodGenerator(Generator, Protocol):
    """A generator with an exact likelihood (or a bound on it): flow, PixelCNN, VAE."""

    def bits_per_dim(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Per-image negative log-likelihood in bits per dimension, (n,), of images in [-1, 1]."""


def load_generator(model_dir: str | Path, *, device: str | torch.device = "cpu") -> Generator:
    """Rebuild the generator exported in `model_dir`; one-line errors for a missing or unknown model."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {model_dir} an exported genpipe generator?")
    family = json.loads(config_path.read_text()).get("family")
    if family not in FAMILIES:
        raise ValueError(
            f"{config_path}: family {family!r} is not a generator; valid: {', '.join(sorted(FAMILIES))}"
        )
    return importlib.import_module(FAMILIES[family]).load(model_dir, device=torch.device(device))


def save_generator(
    path: str | Path,
    *,
    family: str,
    state: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
) -> None:
    """Write a generator folder atomically: weights, config.json with `family`, the carried tokenizer."""
    from safetensors.torch import save_file

    if family not in FAMILIES:
        raise ValueError(f"unknown generator family {family!r}; valid: {', '.join(sorted(FAMILIES))}")
    with atomic_dir(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors")
        )
        write_json(tmp / "config.json", {"family": family, **config})
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)


def read_generator(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and config.json of a generator folder (safetensors: no code is unpickled)."""
    from components.io import load_model

    return load_model(model_dir)


def merge_options(family: str, defaults: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by `options`; an unknown option is a one-line error naming the valid ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"{family}: unknown sampling option {unknown[0]!r}; valid: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **options}


def check_choice(name: str, value: Any, valid: tuple | list) -> Any:
    """`value` if it is one of `valid`, else a one-line error naming them."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")
    return value


def sample_labels(labels: torch.Tensor | int, *, num_classes: int) -> tuple[int, torch.Tensor | None]:
    """(n, labels or None): an int asks for n unconditional samples; labels must lie in [0, num_classes)."""
    if isinstance(labels, int):
        if labels < 1:
            raise ValueError(f"number of samples must be at least 1, got {labels}")
        return labels, None
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    if num_classes == 0:
        raise ValueError(
            "this model is unconditional (num_classes=0): pass the number of samples, not labels"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.numel(), labels.long()


def balanced_labels(n: int, *, num_classes: int) -> torch.Tensor | int:
    """The evaluation label set: 0, 1, .., K-1, 0, 1, .. (n of them); n itself when unconditional."""
    if num_classes == 0:
        return n
    return torch.arange(n, dtype=torch.int64) % num_classes
