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
from components.evaluation.scorer import BatchScore, SampleScorer, real_features, score_batch
from components.generators import Generator, LikelihoodGenerator, balanced_labels

Progress = Callable[[int, int, float], None]  # (done, total, seconds so far)
Sink = Callable[[torch.Tensor, torch.Tensor | None], None]  # (images, labels asked for or None)
Runner = Callable[[list["Job"], bool], Iterable["JobResult"]]  # (jobs, keep images) -> results in job order


@dataclass
class Judgement:
    metrics: dict[str, float]
    grid: torch.Tensor  # images for make_grid(nrow=grid_columns): one row per class, CPU


def batch_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th sampling batch: fixed per (seed, batch), independent of the others."""
    return seed * 1_000_003 + index


@dataclass(frozen=True)
class Job:
    """One sampling batch of the set: images start..stop, drawn on batch_seed(seed, index)."""

    index: int
    start: int
    stop: int
    labels: torch.Tensor | None  # (stop - start,) the classes asked for; None: unconditional


@dataclass
class JobResult:
    score: BatchScore
    seconds: float  # sampling time of this batch
    images: torch.Tensor | None  # the batch itself, only when asked to keep it (a dump)


def sample_jobs(n: int, *, num_classes: int, batch_size: int) -> list[Job]:
    """The set's fixed-seed batches, class-balanced labels: 0, 1, ..., K-1, 0, ... (none when K = 0)."""
    labels = balanced_labels(n, num_classes=num_classes)
    return [
        Job(i, start, min(start + batch_size, n), labels[start : start + batch_size] if num_classes else None)
        for i, start in enumerate(range(0, n, batch_size))
    ]


@torch.no_grad()
def run_job(
    generator: Generator,
    evaluator: Evaluator,
    job: Job,
    *,
    seed: int,
    options: dict | None = None,
    accuracy: bool,
    per_row: int,
    keep_images: bool = False,
) -> JobResult:
    """Sample one batch on its own seed and score it; the same in this process or in a Ray worker."""
    rng = torch.Generator(device=_device(generator)).manual_seed(batch_seed(seed, job.index))
    ask = job.labels if job.labels is not None else job.stop - job.start
    t0 = time.perf_counter()
    x = generator.sample(ask, generator=rng, **(options or {}))
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if tuple(x.shape) != (job.stop - job.start, *generator.image_shape):
        raise ValueError(
            f"generator returned {tuple(x.shape)}, expected {(job.stop - job.start, *generator.image_shape)}"
        )
    x = x.float()
    score = score_batch(
        evaluator,
        x,
        job.labels,
        image_shape=tuple(generator.image_shape),
        accuracy=accuracy,
        per_row=per_row,
        start=job.start,
        source="generator",
    )
    return JobResult(score=score, seconds=seconds, images=x.cpu() if keep_images else None)


def _device(generator: Generator) -> torch.device:
    return torch.device(generator.device)


@torch.no_grad()
def warm_up(generator: Generator, *, batch_size: int, options: dict | None = None) -> None:
    """On CUDA, sample one judge-sized batch, unscored, before any batch is timed.

    A generator's first CUDA call pays for kernel selection, library handles and the allocator's
    first blocks: on an H200 the evaluate stage's first judgement read 395 images/s against 1,835
    warm. On a CPU it does nothing: the first batch costs little extra there, a whole batch more
    would. Its own RNG: the judged samples are the same with or without it.
    """
    device = _device(generator)
    if device.type != "cuda":
        return
    rng = torch.Generator(device=device).manual_seed(0)
    generator.sample(
        balanced_labels(batch_size, num_classes=generator.num_classes), generator=rng, **(options or {})
    )
    torch.cuda.synchronize(device)


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
    runner: Runner | None = None,
) -> Judgement:
    """Sample N images and score them in one streaming pass; every figure is a float (the metrics contract).

    `test_images` is the real test split: a tensor (N, C, H, W) or re-iterable batches (`SplitImages`).
    `runner(jobs, keep_images)` yields each job's `JobResult` in job order (e.g. from Ray workers, each
    calling `run_job`); by default the jobs run here, one after another.
    """
    was_training = evaluator.training
    evaluator.eval()
    accuracy = generator.num_classes > 0 and evaluator.num_classes == generator.num_classes
    try:
        if runner is None:
            warm_up(generator, batch_size=min(batch_size, n), options=options)

            def runner(jobs: list[Job], keep_images: bool) -> Iterator[JobResult]:
                for job in jobs:
                    yield run_job(
                        generator,
                        evaluator,
                        job,
                        seed=seed,
                        options=options,
                        accuracy=accuracy,
                        per_row=grid_columns,
                        keep_images=keep_images,
                    )

        scorer = SampleScorer(
            None,
            image_shape=generator.image_shape,
            num_classes=generator.num_classes,
            accuracy=accuracy,
            grid_columns=grid_columns,
            source="generator",
        )
        jobs = sample_jobs(n, num_classes=generator.num_classes, batch_size=batch_size)
        seconds = 0.0
        for job, result in zip(jobs, runner(jobs, sink is not None), strict=True):
            scorer.merge(result.score)
            seconds += result.seconds
            if sink is not None:
                sink(result.images, job.labels)
            if progress is not None:
                progress(job.stop, n, seconds)
        real = real_features(evaluator, test_images, batch_size=batch_size)
        metrics = scorer.metrics(test_stats=test_stats, real_features=real, floor=floor, pr_k=pr_k)
    finally:
        evaluator.train(was_training)
    metrics["images_per_s"] = n / max(seconds, 1e-9)  # per sampler: the sum of every batch's sampling time
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
