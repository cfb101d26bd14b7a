"""The real data a judge compares against: the evaluator's feature statistics of the train and test
splits, saved beside its weights by `train_evaluator`, and the real-vs-real Fréchet distance (the
floor: what a perfect generator of train-split-like images would score against the test split).

Every judge (evaluate, the tokenizer's rFID, the benchmarks) reads them through `load_reference`,
so the floor has one definition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from components.evaluation.batches import BATCH, SplitImages
from components.evaluation.evaluator import Evaluator
from components.evaluation.frechet import FeatureStats, feature_stats, frechet_distance

TEST_STATS, TRAIN_STATS = "test_stats.safetensors", "train_stats.safetensors"  # in the evaluator's folder


@dataclass(frozen=True)
class Reference:
    """Feature statistics of the real train and test splits."""

    train: FeatureStats
    test: FeatureStats

    @cached_property
    def floor(self) -> float:
        """FD(train, test): the distance sampling noise alone leaves between two real sets."""
        return frechet_distance(self.train, self.test)


def compute_reference(
    evaluator: Evaluator,
    *,
    train: torch.Tensor | Iterable[torch.Tensor],
    test: torch.Tensor | Iterable[torch.Tensor],
) -> Reference:
    """The statistics of the real train and test images in [-1, 1]: tensors (N, C, H, W) or batches.

    Batches (e.g. `SplitImages`) stream: one pass of running sums, one batch of images in memory.
    """
    return Reference(train=feature_stats(evaluator, train), test=feature_stats(evaluator, test))


def reference_from_data(evaluator: Evaluator, data_dir: str | Path, *, batch_size: int = BATCH) -> Reference:
    """`compute_reference` of a prepared directory's train and test splits, streamed shard by shard."""
    return compute_reference(
        evaluator,
        train=SplitImages(data_dir, "train", batch_size=batch_size),
        test=SplitImages(data_dir, "test", batch_size=batch_size),
    )


def save_reference(reference: Reference, evaluator_dir: str | Path) -> None:
    """Write both statistics into the evaluator's folder (inside its atomic write)."""
    reference.train.save(Path(evaluator_dir) / TRAIN_STATS)
    reference.test.save(Path(evaluator_dir) / TEST_STATS)


def load_reference(evaluator_dir: str | Path) -> Reference:
    """The statistics `save_reference` wrote; a missing file is one line naming it."""
    paths = {name: Path(evaluator_dir) / name for name in (TRAIN_STATS, TEST_STATS)}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run the train_evaluator stage (dvc repro train_evaluator)"
            )
    return Reference(train=FeatureStats.load(paths[TRAIN_STATS]), test=FeatureStats.load(paths[TEST_STATS]))
