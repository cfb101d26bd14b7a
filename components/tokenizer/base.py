"""What every quantizer shares: its output, its interface and codebook-usage statistics.

Perplexity is exp(H(p)) of the code histogram p (van den Oord et al. 2017 report it as a usage
measure): it equals the number of codes when usage is uniform and 1 when a single code is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from components.training.distributed import all_reduce_sum


@dataclass
class QuantizerOutput:
    """z_q (B, D, h, w) with straight-through gradients, a scalar loss, indices (B, h, w), diagnostics."""

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class Quantizer(nn.Module):
    """Interface of the quantizers in the registry (`components.tokenizer.quantizers`)."""

    codebook_size: int
    dim: int  # channels D of the z it quantizes

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        raise NotImplementedError

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) int64 -> z_q (B, D, h, w)."""
        raise NotImplementedError

    def update(self) -> None:
        """Apply statistics gathered by training forwards (EMA codebook, restarts); default: none."""


def histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts per code (K,) as float, from indices of any shape."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size).float()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised histogram `counts` (K,)."""
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def batch_diagnostics(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Perplexity and share of codes used in this batch (detached)."""
    counts = histogram(indices.detach(), codebook_size)
    return {"perplexity": perplexity(counts), "batch_usage": (counts > 0).float().mean()}


class CodeUsage:
    """Code histogram over a validation pass: share of codes used and perplexity."""

    def __init__(self, codebook_size: int) -> None:
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, indices: torch.Tensor) -> None:
        # counts follow the indices' device, so that an NCCL all-reduce finds them on the GPU
        counts = histogram(indices.detach(), self.codebook_size).double()
        self.counts = self.counts.to(counts.device) + counts

    def all_reduce(self) -> None:
        """Sum the histograms of all ranks (a collective: call it on every rank or on none)."""
        self.counts = all_reduce_sum(self.counts)

    def usage(self) -> float:
        """Share of the codebook used at least once since `reset` (0..1)."""
        return float((self.counts > 0).double().mean())

    def perplexity(self) -> float:
        return float(perplexity(self.counts))
