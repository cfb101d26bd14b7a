"""Stage configs: each composes the component configs a stage wires together."""

from __future__ import annotations

from components.evaluation.evaluator import EvaluatorConfig
from components.schema import StrictConfig
from components.training.config import LoopConfig


class TrainEvaluatorConfig(StrictConfig):
    """The `train_evaluator` section."""

    model: EvaluatorConfig = EvaluatorConfig()
    loop: LoopConfig
