"""What every quantizer shares: its output, its interface, codebook-usage statistics, rank helpers.

Perplexity is exp(H(p)) of the code histogram p (van den Oord et al. 2017 report it as a usage
measure): it equals the number of codes when usage is uniform and 1 when a single code is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


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
        self.counts += histogram(indices.detach(), self.codebook_size).to("cpu", torch.float64)

    def all_reduce(self) -> None:
        """Sum the histograms of all ranks (call on every rank, before `usage`/`perplexity`)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    def usage(self) -> float:
        """Share of the codebook used at least once since `reset` (0..1)."""
        return float((self.counts > 0).double().mean())

    def perplexity(self) -> float:
        return float(perplexity(self.counts))


# Rank helpers. They go through torch.distributed directly, guarded by is_initialized, so one
# process (tests, export) needs no process group.
def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op in one process)."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, *, src: int = 0) -> torch.Tensor:
    """Overwrite `t` with rank `src`'s value in place (no-op in one process)."""
    if distributed():
        dist.broadcast(t, src=src)
    return t


def rank() -> int:
    return dist.get_rank() if distributed() else 0
