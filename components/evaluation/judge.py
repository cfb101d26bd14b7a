"""The one judge of every generator: N samples on fixed seeds, scored on the evaluator's features.

Fréchet distance (Heusel et al. 2017, eq. 6) against the real test statistics, on the same scale as
the real-vs-real floor; conditional accuracy (the evaluator's top-1 on the label asked for);
improved precision and recall (Kynkäänniemi et al. 2019) against the real test features; sampling
throughput; bits/dim on the test split for families with a likelihood; a grid with one row per class.
Samples stream batch by batch through `SampleScorer`: the set is never held whole, and a `sink`
(e.g. a `SampleWriter`) may keep a copy of exactly what was judged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from components.evaluation.batches import batches_of
from components.evaluation.evaluator import Evaluator
from components.evaluation.frechet import FeatureStats
from components.evaluation.scorer import SampleScorer, real_features
from components.generators import Generator, LikelihoodGenerator, balanced_labels

Progress = Callable[[int, int, float], None]  # (done, total, seconds so far)
Sink = Callable[[torch.Tensor, torch.Tensor | None], None]  # (images, labels asked for or None)


@dataclass
class Judgement:
    metrics: dict[str, float]
    grid: torch.Tensor  # images for make_grid(nrow=grid_columns): one row per class, CPU


def batch_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th sampling batch: fixed per (seed, batch), independent of the others."""
    return seed * 1_000_003 + index


@torch.no_grad()
def sample_batches(
    generator: Generator,
    n: int,
    *,
    seed: int,
    batch_size: int,
    options: dict | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, float]]:
    """N class-balanced samples in fixed-seed batches: (images on CPU, labels or None, sampling seconds so far)."""
    labels = balanced_labels(n, num_classes=generator.num_classes)
    seconds = 0.0
    for i, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        rng = torch.Generator(device=_device(generator)).manual_seed(batch_seed(seed, i))
        ask = labels[start:stop] if isinstance(labels, torch.Tensor) else stop - start
        t0 = time.perf_counter()
        x = generator.sample(ask, generator=rng, **(options or {}))
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        if tuple(x.shape) != (stop - start, *generator.image_shape):
            raise ValueError(
                f"generator returned {tuple(x.shape)}, expected {(stop - start, *generator.image_shape)}"
            )
        if progress is not None:
            progress(stop, n, seconds)
        yield x.float().cpu(), (ask if isinstance(ask, torch.Tensor) else None), seconds


def _device(generator: Generator) -> torch.device:
    return torch.device(getattr(generator, "device", "cpu"))


@torch.no_grad()
def judge(
    generator: Generator,
    *,
    evaluator: Evaluator,
    test_images: torch.Tensor | Iterable[torch.Tensor],
    test_stats: FeatureStats,
    floor: float,
    n: int,
    seed: int,
    batch_size: int,
    options: dict | None = None,
    pr_k: int = 3,
    progress: Progress | None = None,
    grid_columns: int = 10,
    sink: Sink | None = None,
) -> Judgement:
    """Sample N images and score them in one streaming pass; every figure is a float (the metrics contract).

    `test_images` is the real test split: a tensor (N, C, H, W) or re-iterable batches (`SplitImages`).
    """
    was_training = evaluator.training
    evaluator.eval()
    try:
        scorer = SampleScorer(
            evaluator,
            image_shape=generator.image_shape,
            num_classes=generator.num_classes,
            accuracy=generator.num_classes > 0 and evaluator.num_classes == generator.num_classes,
            grid_columns=grid_columns,
            source="generator",
        )
        seconds = 0.0
        for images, labels, elapsed in sample_batches(
            generator, n, seed=seed, batch_size=batch_size, options=options, progress=progress
        ):
            seconds = elapsed
            scorer.add(images, labels)
            if sink is not None:
                sink(images, labels)
        real = real_features(evaluator, test_images, batch_size=batch_size)
        metrics = scorer.metrics(test_stats=test_stats, real_features=real, floor=floor, pr_k=pr_k)
    finally:
        evaluator.train(was_training)
    metrics["images_per_s"] = n / max(seconds, 1e-9)
    nfe = getattr(generator, "nfe", None)
    if callable(nfe):
        metrics["nfe"] = float(nfe(**(options or {})))
    if isinstance(generator, LikelihoodGenerator):  # families with a likelihood: flow, PixelCNN, VAE
        rng = torch.Generator().manual_seed(seed)
        bpd = torch.cat(
            [
                generator.bits_per_dim(x, generator=rng).cpu()
                for x in batches_of(test_images, batch_size=batch_size)
            ]
        )
        metrics["bits_per_dim"] = float(bpd.mean())
    return Judgement(metrics=metrics, grid=scorer.grid_images())
