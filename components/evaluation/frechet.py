"""Fréchet distance between Gaussians fitted to feature sets (FID, Heusel et al. 2017, eq. 6).

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

The trace of the matrix square root is taken from the symmetric PSD matrix
Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2), which has the same eigenvalues as Sigma_1 Sigma_2 but a real,
stable eigendecomposition (eigh), in float64. torchmetrics' FrechetInceptionDistance accepts a custom
feature module and agrees numerically (float64 states, `eigvals` of the non-symmetric product), but
it keeps raw sums inside metric state, casts the result back to float32 and only exposes the formula
as a private function; the pipeline needs stored statistics (test-set mu, Sigma computed once by
`train_evaluator`, compared later), so the closed form lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from components.evaluation.evaluator import Evaluator


@dataclass(frozen=True)
class FeatureStats:
    """Mean mu (D,), unbiased covariance sigma (D, D), both float64, of n feature vectors."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int

    def __post_init__(self) -> None:
        d = self.mu.shape[0]
        if self.mu.ndim != 1 or self.sigma.shape != (d, d) or self.n < 2:
            raise ValueError(
                f"FeatureStats needs mu (D,), sigma (D, D), n >= 2; got {tuple(self.mu.shape)}, "
                f"{tuple(self.sigma.shape)}, n={self.n}"
            )

    @classmethod
    def from_features(cls, f: torch.Tensor) -> FeatureStats:
        """Statistics of features (N, D)."""
        acc = StatsAccumulator()
        acc.update(f)
        return acc.stats()

    def save(self, path: str | Path) -> None:
        """Write mu, sigma (tensors) and n (metadata) to a safetensors file, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {"mu": self.mu.contiguous(), "sigma": self.sigma.contiguous()}, tmp, metadata={"n": str(self.n)}
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "n" not in meta:
            raise ValueError(f"{path}: not a FeatureStats file (metadata lacks 'n')")
        t = load_file(path)
        return cls(mu=t["mu"].double(), sigma=t["sigma"].double(), n=int(meta["n"]))


class StatsAccumulator:
    """Streaming mean and covariance in float64, merging batches exactly (Chan et al. 1979)."""

    def __init__(self) -> None:
        self.n = 0
        self.mu: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None  # sum of centred outer products (D, D)

    def update(self, f: torch.Tensor) -> None:
        """Add features (B, D)."""
        if f.ndim != 2:
            raise ValueError(f"features must be (B, D), got {tuple(f.shape)}")
        f = f.detach().to("cpu", torch.float64)
        n_b = f.shape[0]
        if n_b == 0:
            return
        if not torch.isfinite(f).all():
            raise FloatingPointError(
                f"features of a batch of {n_b} hold NaN or Inf (the images or the evaluator)"
            )
        mu_b = f.mean(dim=0)
        c = f - mu_b
        m2_b = c.T @ c
        if self.mu is None or self.m2 is None:
            self.n, self.mu, self.m2 = n_b, mu_b, m2_b
            return
        if self.mu.shape != mu_b.shape:
            raise ValueError(f"feature dim changed from {self.mu.shape[0]} to {mu_b.shape[0]}")
        n = self.n + n_b
        delta = mu_b - self.mu
        self.mu = self.mu + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def stats(self) -> FeatureStats:
        if self.mu is None or self.m2 is None or self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for statistics, got {self.n}")
        return FeatureStats(mu=self.mu, sigma=self.m2 / (self.n - 1), n=self.n)


def _psd_eigvals(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and vectors of a symmetric PSD matrix, rounding noise (< D eps max) set to zero.

    Without the cut, sqrt turns eigenvalues of 1e-16 that should be 0 into 1e-8 errors.
    """
    w, v = torch.linalg.eigh((a + a.T) / 2)
    cut = a.shape[0] * torch.finfo(a.dtype).eps * w.abs().max()
    return torch.where(w > cut, w, torch.zeros_like(w)), v


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Squared Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dims differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    mu_a, mu_b = a.mu.double(), b.mu.double()
    s_a, s_b = a.sigma.double(), b.sigma.double()
    w, v = _psd_eigvals(s_a)
    r = (v * w.sqrt()) @ v.T  # sigma_a^(1/2)
    tr_sqrt = _psd_eigvals(r @ s_b @ r)[0].sqrt().sum()  # same spectrum as sigma_a sigma_b
    d2 = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    return max(float(d2), 0.0)  # identical sets can round to -1e-12


@torch.no_grad()
def extract_features(
    evaluator: Evaluator, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 256
) -> torch.Tensor:
    """Evaluator features (N, feature_dim), float32 on CPU, of images or an iterable of image batches."""
    acc: list[torch.Tensor] = []
    stream_features(evaluator, images, batch_size=batch_size, sink=acc.append)
    if not acc:
        raise ValueError("extract_features got no images")
    return torch.cat(acc)


@torch.no_grad()
def feature_stats(
    evaluator: Evaluator, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 256
) -> FeatureStats:
    """Stream images (a tensor, or an iterable of (B, C, H, W) batches) through the evaluator's features."""
    acc = StatsAccumulator()
    stream_features(evaluator, images, batch_size=batch_size, sink=acc.update)
    return acc.stats()


@torch.no_grad()
def stream_features(
    evaluator: Evaluator,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int,
    sink: Callable[[torch.Tensor], object],
) -> None:
    """Feed features of each batch to `sink`, in eval mode, restoring the previous mode."""
    was_training = evaluator.training
    evaluator.eval()
    device = next(evaluator.parameters()).device
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    try:
        for x in batches:
            sink(evaluator.features(x.to(device)).float().cpu())
    finally:
        evaluator.train(was_training)
