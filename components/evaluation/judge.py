"""The one judge of every generator: N samples on fixed seeds, scored on the evaluator's features.

Fréchet distance (Heusel et al. 2017, eq. 6) against the real test statistics, on the same scale as
the real-vs-real floor; conditional accuracy (the evaluator's top-1 on the label asked for);
improved precision and recall (Kynkäänniemi et al. 2019) against the real test features; sampling
throughput; bits/dim on the test split for families with a likelihood; a grid with one row per class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from components.evaluation.evaluator import Evaluator, predict
from components.evaluation.frechet import FeatureStats, extract_features, frechet_distance
from components.evaluation.prdc import prdc
from components.generators import Generator, LikelihoodGenerator, balanced_labels

Progress = Callable[[int, int, float], None]  # (done, total, seconds so far)


@dataclass
class Judgement:
    metrics: dict[str, float]
    images: torch.Tensor  # (N, C, H, W) in [-1, 1], CPU
    labels: torch.Tensor | None  # (N,) the labels asked for; None when unconditional


def batch_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th sampling batch: fixed per (seed, batch), independent of the others."""
    return seed * 1_000_003 + index


@torch.no_grad()
def sample_set(
    generator: Generator,
    n: int,
    *,
    seed: int,
    batch_size: int,
    options: dict | None = None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """N class-balanced samples in fixed-seed batches: (images on CPU, labels or None, sampling seconds)."""
    labels = balanced_labels(n, num_classes=generator.num_classes)
    out, seconds = [], 0.0
    for i, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        rng = torch.Generator(device=_device(generator)).manual_seed(batch_seed(seed, i))
        ask = labels[start:stop] if isinstance(labels, torch.Tensor) else stop - start
        t0 = time.perf_counter()
        x = generator.sample(ask, generator=rng, **(options or {}))
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        _check_images(x, stop - start, generator.image_shape)
        out.append(x.float().cpu())
        if progress is not None:
            progress(stop, n, seconds)
    return torch.cat(out), (labels if isinstance(labels, torch.Tensor) else None), seconds


def _device(generator: Generator) -> torch.device:
    return torch.device(getattr(generator, "device", "cpu"))


def _check_images(x: torch.Tensor, n: int, shape: tuple[int, int, int]) -> None:
    if tuple(x.shape) != (n, *shape):
        raise ValueError(f"generator returned {tuple(x.shape)}, expected {(n, *shape)}")
    if not torch.isfinite(x).all():
        raise FloatingPointError("generator returned non-finite pixels (NaN or Inf)")
    if x.min() < -1.0001 or x.max() > 1.0001:
        raise ValueError(
            f"generator returned pixels in [{float(x.min()):.3f}, {float(x.max()):.3f}], not [-1, 1]"
        )


@torch.no_grad()
def judge(
    generator: Generator,
    *,
    evaluator: Evaluator,
    test_images: torch.Tensor,
    test_stats: FeatureStats,
    floor: float,
    n: int,
    seed: int,
    batch_size: int,
    options: dict | None = None,
    pr_k: int = 3,
    progress: Progress | None = None,
) -> Judgement:
    """Sample N images and score them; every figure is a float (the metrics contract)."""
    images, labels, seconds = sample_set(
        generator, n, seed=seed, batch_size=batch_size, options=options, progress=progress
    )
    fake = extract_features(evaluator, images)
    fid = frechet_distance(FeatureStats.from_features(fake.double()), test_stats)
    real = extract_features(evaluator, test_images)
    metrics = {
        "fid": fid,
        "fid_over_floor": fid / max(floor, 1e-12),
        "fid_floor": floor,
        **{k: v for k, v in prdc(real, fake, k=pr_k).items() if k in ("precision", "recall")},
        "images_per_s": n / max(seconds, 1e-9),
        "num_samples": float(n),
    }
    if labels is not None and evaluator.num_classes == generator.num_classes:
        metrics["cond_accuracy"] = float((predict(evaluator, images) == labels).float().mean())
    nfe = getattr(generator, "nfe", None)
    if callable(nfe):
        metrics["nfe"] = float(nfe(**(options or {})))
    if isinstance(generator, LikelihoodGenerator):  # families with a likelihood: flow, PixelCNN, VAE
        rng = torch.Generator().manual_seed(seed)
        bpd = torch.cat(
            [generator.bits_per_dim(x, generator=rng).cpu() for x in test_images.split(batch_size)]
        )
        metrics["bits_per_dim"] = float(bpd.mean())
    return Judgement(metrics=metrics, images=images, labels=labels)


def class_rows(
    images: torch.Tensor, labels: torch.Tensor | None, *, num_classes: int, per_row: int
) -> torch.Tensor:
    """Images for a grid with one row per class (`per_row` samples each); unconditional: rows of the first ones."""
    if labels is None or num_classes == 0:
        return images[: per_row * min(8, max(1, images.shape[0] // per_row))]
    rows = []
    for c in range(num_classes):
        picked = images[labels == c][:per_row]
        if picked.shape[0] < per_row:  # fewer samples of this class than columns: pad with blank tiles
            picked = torch.cat(
                [picked, picked.new_full((per_row - picked.shape[0], *images.shape[1:]), -1.0)]
            )
        rows.append(picked)
    return torch.cat(rows)
