"""Stage configs: each composes the component configs a stage wires together."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from components import catalog
from components.diffusion.config import DiffusionStageConfig
from components.evaluation.evaluator import EvaluatorConfig
from components.generators import MODELS
from components.prior.config import PriorConfig, PriorSamplingConfig
from components.schema import StrictConfig
from components.tokenizer.config import TOKEN_GRID, TokenizerConfig
from components.training.config import LoopConfig


class TrainEvaluatorConfig(StrictConfig):
    """The `train_evaluator` section."""

    model: EvaluatorConfig = EvaluatorConfig()
    loop: LoopConfig


class TrainTokenizerConfig(StrictConfig):
    """The `train_tokenizer` section: a VQGAN (model) trained by the loop."""

    model: TokenizerConfig
    loop: LoopConfig
    num_grid: int = Field(default=32, ge=1, le=256, description="test images in the reconstruction grid")
    token_grid: tuple[int, int] = Field(
        default=TOKEN_GRID, description="token grid sides (min, max) the downsampling follows the data within"
    )

    @model_validator(mode="after")
    def _grid_range(self) -> TrainTokenizerConfig:
        lo, hi = self.token_grid
        if not 1 <= lo <= hi:
            raise ValueError(f"token_grid={list(self.token_grid)} must be [min, max] with 1 <= min <= max")
        return self


class EncodeConfig(StrictConfig):
    """The `encode` section: batch inference of the tokenizer over every split."""

    batch_size: int = Field(default=256, gt=0)
    num_actors: int = Field(default=1, ge=1, description="Ray Data actors, each holding one tokenizer")
    shard_rows: int = Field(default=4096, gt=0)


class EvaluateConfig(StrictConfig):
    """The `evaluate` section: how the one judge samples and scores every generator."""

    num_samples: int | None = Field(default=None, ge=10, description="null: the train split's size")
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=512, gt=0, description="images per sampling call")
    pr_k: int = Field(default=3, ge=1, description="k of improved precision/recall (paper: 3)")
    grid_columns: int = Field(default=10, ge=1, le=64, description="samples per class row of the grid")
    threads: int | None = Field(default=None, ge=1, description="torch threads; null: every core")
    device: Literal["cpu", "cuda"] = "cpu"
    num_workers: int = Field(
        default=0,
        ge=0,
        description="0: sample in the stage's process; N: on N Ray actors (a GPU each on cuda)",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per model (models/<name>): sampling options over its defaults"
    )

    @model_validator(mode="after")
    def _known_models(self) -> EvaluateConfig:
        unknown = sorted(set(self.options) - set(MODELS))
        if unknown:
            raise ValueError(f"options for unknown model {unknown[0]!r}; valid: {', '.join(MODELS)}")
        return self


class DiffusionVariantConfig(DiffusionStageConfig):
    """One variant of `train_diffusion` (pixel or latent): objective, default sampling, loop."""

    loop: LoopConfig


class TrainDiffusionConfig(StrictConfig):
    """The `train_diffusion` section: a DVC `foreach` over pixel and latent space."""

    pixel: DiffusionVariantConfig
    latent: DiffusionVariantConfig


class PriorVariantConfig(StrictConfig):
    """One variant of `train_prior` (gpt or maskgit): the prior, its default sampling, the loop."""

    model: PriorConfig
    sampling: PriorSamplingConfig = PriorSamplingConfig()
    loop: LoopConfig


class TrainPriorConfig(StrictConfig):
    """The `train_prior` section: a DVC `foreach` over the GPT and MaskGIT priors."""

    gpt: PriorVariantConfig
    maskgit: PriorVariantConfig

    @model_validator(mode="after")
    def _kinds_match(self) -> TrainPriorConfig:
        for variant in ("gpt", "maskgit"):
            kind = getattr(self, variant).model.kind
            if kind != variant:
                raise ValueError(
                    f"{variant}.model.kind={kind!r} must be {variant!r} (the variant's own kind)"
                )
        return self


def _zoo_section() -> type[StrictConfig]:
    """The `train_zoo` section: one field per catalog row the stage trains, typed by its recipe."""
    rows = [m for m in catalog.MODELS if m.stage == "train_zoo"]
    return create_model(
        "TrainZooConfig",
        __base__=StrictConfig,
        __doc__="The `train_zoo` section: a DVC `foreach` over the classic families (catalog rows).",
        **{m.variant: (catalog.recipe(m).config, ...) for m in rows},
    )


TrainZooConfig = _zoo_section()
