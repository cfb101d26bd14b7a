"""Reconstruction metrics: PSNR and SSIM (Wang et al. 2004), per image and as a mean.

    PSNR = 10 log10(R^2 / MSE),  R the data range (2 for images in [-1, 1], 1 for [0, 1]).

SSIM uses torchmetrics with the paper's window: Gaussian, 11x11, sigma 1.5, K1=0.01, K2=0.03,
computed per channel. torchmetrics reflect-pads the image by 5 pixels and averages the SSIM map
over every pixel, so 8x8 and 16x16 images get a map of their own size (a 'valid' map would be 6x6
at 16x16 and empty at 8x8); values are therefore a little different from skimage's valid-window SSIM.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from components.evaluation.evaluator import Evaluator
from components.evaluation.frechet import FeatureStats, StatsAccumulator, stream_features

DATA_RANGE = 2.0  # images in [-1, 1]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"need two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-image PSNR (B,) in dB; identical images give +inf."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-image SSIM (B,), Gaussian window 11, sigma 1.5 (Wang et al. 2004), averaged over channels."""
    _check_pair(x, y)
    if min(x.shape[2:]) < 6:
        raise ValueError(
            f"SSIM needs images of at least 6x6 (reflect padding by 5), got {tuple(x.shape[2:])}"
        )
    out = structural_similarity_index_measure(
        x.float(),
        y.float(),
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=data_range,
        reduction="none",
    )
    return out


def recon_metrics(x: torch.Tensor, y: torch.Tensor, *, data_range: float = DATA_RANGE) -> dict[str, float]:
    """Mean PSNR and SSIM of reconstructions x against originals y."""
    return {
        "psnr": float(psnr(x, y, data_range=data_range).mean()),
        "ssim": float(ssim(x, y, data_range=data_range).mean()),
    }


class ReconScore:
    """Reconstruction figures over a stream of (originals, reconstructions) batches, in one batch of
    memory: the means of PSNR, SSIM and L1 (float64 sums, so the figure never depends on the batch
    size), the evaluator's feature statistics of the reconstructions, and the first `keep` pairs."""

    def __init__(self, evaluator: Evaluator | None = None, *, keep: int = 0) -> None:
        self.evaluator, self.keep, self.n = evaluator, keep, 0
        self.sums = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0}
        self.features = StatsAccumulator()
        self.originals: list[torch.Tensor] = []
        self.recons: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, x_rec: torch.Tensor) -> None:
        _check_pair(x_rec, x)
        self.sums["psnr"] += float(psnr(x_rec, x).double().sum())
        self.sums["ssim"] += float(ssim(x_rec, x).double().sum())
        self.sums["l1"] += float((x_rec.double() - x.double()).abs().flatten(1).mean(dim=1).sum())
        if self.evaluator is not None:
            stream_features(self.evaluator, x_rec, batch_size=len(x_rec), sink=self.features.update)
        room = self.keep - sum(len(t) for t in self.originals)
        if room > 0:
            self.originals.append(x[:room])
            self.recons.append(x_rec[:room])
        self.n += len(x)

    def metrics(self) -> dict[str, float]:
        """{"psnr", "ssim", "l1"}: the means over every image seen."""
        if self.n == 0:
            raise ValueError("no reconstructions were scored (an empty split?)")
        return {k: v / self.n for k, v in self.sums.items()}

    def stats(self) -> FeatureStats:
        """The reconstructions' feature statistics (needs an evaluator)."""
        return self.features.stats()

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `keep` originals and their reconstructions."""
        return torch.cat(self.originals), torch.cat(self.recons)
