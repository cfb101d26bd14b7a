"""Scoring a sample set in one streaming pass: what the judge does with every batch of images.

Each batch goes through the evaluator once: its features feed the running mean and covariance
(float64 Chan merges, `StatsAccumulator`) for the Fréchet distance (Heusel et al. 2017, eq. 6) and
are kept (N x feature_dim, small) for improved precision and recall (Kynkäänniemi et al. 2019),
which need every feature vector; the head's top-1 on the same features counts the conditional
accuracy; the first images of each class are kept for the grid. The images themselves are dropped
after their batch, so a sample set of any size costs one batch of images.

The evaluate stage (samples from a generator) and `genpipe evaluate --samples` (samples from a
file) both score through this class, so their figures compare.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from components.evaluation.batches import batches_of
from components.evaluation.evaluator import Evaluator
from components.evaluation.frechet import FeatureStats, StatsAccumulator, extract_features, frechet_distance
from components.evaluation.prdc import prdc

GRID_ROWS = 8  # rows of an unconditional grid


def check_images(x: torch.Tensor, *, shape: tuple[int, ...], start: int, source: str) -> None:
    """A batch (B, *shape) of finite pixels in [-1, 1]; else one line naming `source` and the image."""
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{source} gave images of shape {tuple(x.shape)}, expected (B, {', '.join(map(str, shape))})"
        )
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not finite.all():
        first = start + int((~finite).nonzero()[0, 0])
        raise FloatingPointError(f"{source}: image {first} has non-finite pixels (NaN or Inf)")
    flat = x.reshape(x.shape[0], -1)
    outside = (flat.amin(dim=1) < -1.0001) | (flat.amax(dim=1) > 1.0001) if x.numel() else finite & False
    if outside.any():
        i = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"{source}: image {start + i} has pixels in [{float(flat[i].min()):.3f}, {float(flat[i].max()):.3f}], "
            "not [-1, 1]"
        )


class ClassGrid:
    """The first `per_row` images of each class as they stream past (unconditional: the first rows)."""

    def __init__(self, *, num_classes: int, per_row: int) -> None:
        self.num_classes, self.per_row = num_classes, per_row
        self.kept: dict[int, list[torch.Tensor]] = {}

    def add(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is None or self.num_classes == 0:
            have = sum(x.shape[0] for x in self.kept.get(-1, []))
            want = self.per_row * GRID_ROWS - have
            if want > 0:
                self.kept.setdefault(-1, []).append(images[:want].clone())
            return
        for c in labels.unique().tolist():
            have = sum(x.shape[0] for x in self.kept.get(c, []))
            if have < self.per_row:
                self.kept.setdefault(c, []).append(images[labels == c][: self.per_row - have].clone())

    def images(self, *, shape: tuple[int, ...]) -> torch.Tensor:
        """Images for `make_grid(..., nrow=per_row)`: one row per class, short rows padded with blank tiles."""
        if -1 in self.kept or self.num_classes == 0:
            first = torch.cat(self.kept.get(-1, [torch.empty(0, *shape)]))
            return first[: self.per_row * min(GRID_ROWS, max(1, first.shape[0] // self.per_row))]
        rows = []
        for c in range(self.num_classes):
            row = torch.cat(self.kept.get(c, [torch.empty(0, *shape)]))
            rows.append(torch.cat([row, row.new_full((self.per_row - row.shape[0], *shape), -1.0)]))
        return torch.cat(rows)


@dataclass
class BatchScore:
    """What one batch of samples adds to a judgement: small, so a Ray worker can hand it back."""

    features: torch.Tensor  # (B, feature_dim) float32, CPU
    correct: int  # top-1 hits on the labels asked for (0 when accuracy is not scored)
    grid: torch.Tensor  # the batch's first `per_row` images of each class (unconditional: first rows), CPU
    grid_labels: torch.Tensor | None


@torch.no_grad()
def score_batch(
    evaluator: Evaluator,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    image_shape: tuple[int, ...],
    accuracy: bool,
    per_row: int,
    start: int = 0,
    source: str = "samples",
) -> BatchScore:
    """One batch (B, C, H, W) in [-1, 1] through the evaluator; `labels` (B,) are the classes asked for."""
    check_images(images, shape=image_shape, start=start, source=source)
    if labels is not None and tuple(labels.shape) != (images.shape[0],):
        raise ValueError(f"{source}: {tuple(labels.shape)} labels for {images.shape[0]} images")
    if evaluator.training:
        raise RuntimeError("the evaluator must be in eval mode to score samples (call .eval())")
    f = evaluator.features(images.to(next(evaluator.parameters()).device)).float()  # (B, feature_dim)
    correct = 0
    if accuracy and labels is not None:
        predicted = evaluator.classify(f).argmax(dim=1).cpu()  # = evaluator(x), from one forward
        correct = int((predicted == labels.cpu()).sum())
    images = images.cpu()
    if labels is None:
        grid, grid_labels = images[: per_row * GRID_ROWS].clone(), None
    else:
        labels = labels.cpu()
        keep = torch.zeros(labels.shape[0], dtype=torch.bool)
        for c in labels.unique().tolist():
            keep[(labels == c).nonzero()[:per_row, 0]] = True
        grid, grid_labels = images[keep].clone(), labels[keep].clone()
    return BatchScore(features=f.cpu(), correct=correct, grid=grid, grid_labels=grid_labels)


class SampleScorer:
    """Streams batches of samples (and the labels asked for) through the evaluator; `metrics` at the end."""

    def __init__(
        self,
        evaluator: Evaluator | None,
        *,
        image_shape: tuple[int, ...],
        num_classes: int,
        accuracy: bool,
        grid_columns: int = 10,
        source: str = "samples",
    ) -> None:
        self.evaluator, self.image_shape, self.source = evaluator, tuple(image_shape), source
        self.num_classes, self.accuracy = num_classes, accuracy
        self.stats = StatsAccumulator()
        self.features: list[torch.Tensor] = []  # (B, feature_dim) float32 per batch: precision/recall
        self.correct = self.n = 0
        self.grid = ClassGrid(num_classes=num_classes, per_row=grid_columns)

    def add(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Score one batch (B, C, H, W) in [-1, 1] here; labels (B,) int64 are the classes asked for, or None."""
        if self.evaluator is None:
            raise ValueError("this scorer merges scores made elsewhere (no evaluator): use merge()")
        score = score_batch(
            self.evaluator,
            images,
            labels,
            image_shape=self.image_shape,
            accuracy=self.accuracy,
            per_row=self.grid.per_row,
            start=self.n,
            source=self.source,
        )
        self.merge(score)

    def merge(self, score: BatchScore) -> None:
        """Add a batch's score (made here or by a worker); batches merge in sampling order."""
        self.stats.update(score.features)
        self.features.append(score.features)
        self.correct += score.correct
        self.grid.add(score.grid, score.grid_labels)
        self.n += score.features.shape[0]

    def metrics(
        self, *, test_stats: FeatureStats, real_features: torch.Tensor, floor: float, pr_k: int
    ) -> dict[str, float]:
        """FD, FD over the floor, precision and recall, conditional accuracy: every figure a float."""
        if self.n < 2 or self.n <= pr_k:
            raise ValueError(
                f"{self.source}: {self.n} images; scoring needs at least {max(2, pr_k + 1)} (pr_k={pr_k})"
            )
        fake = torch.cat(self.features)
        fid = frechet_distance(self.stats.stats(), test_stats)
        out = {
            "fid": fid,
            "fid_over_floor": fid / max(floor, 1e-12),
            "fid_floor": floor,
            **{k: v for k, v in prdc(real_features, fake, k=pr_k).items() if k in ("precision", "recall")},
            "num_samples": float(self.n),
        }
        if self.accuracy:
            out["cond_accuracy"] = self.correct / self.n
        return out

    def grid_images(self) -> torch.Tensor:
        """Images for a grid with one row per class (`grid_columns` samples each)."""
        return self.grid.images(shape=self.image_shape)


def real_features(
    evaluator: Evaluator, test_images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int
) -> torch.Tensor:
    """Evaluator features (N, feature_dim) of the real test images, a tensor or streamed batches."""
    return extract_features(evaluator, batches_of(test_images, batch_size=batch_size))
