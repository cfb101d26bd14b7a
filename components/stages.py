"""Stage configs: each composes the component configs a stage wires together."""

from __future__ import annotations

from pydantic import Field

from components.evaluation.evaluator import EvaluatorConfig
from components.schema import StrictConfig
from components.tokenizer.config import TokenizerConfig
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


class EncodeConfig(StrictConfig):
    """The `encode` section: batch inference of the tokenizer over every split."""

    batch_size: int = Field(default=256, gt=0)
    num_actors: int = Field(default=1, ge=1, description="Ray Data actors, each holding one tokenizer")
    shard_rows: int = Field(default=4096, gt=0)
