"""Vector quantization with a learned or EMA codebook and dead-code restart.

VQ-VAE (van den Oord et al. 2017, eq. 3): z_q = e_k with k = argmin_j ||z_e - e_j||^2, gradients
copied straight through from z_q to z_e, and
    L = ||sg[z_e] - e_k||^2 + beta * ||z_e - sg[e_k]||^2,   beta = 0.25.
EMA variant (ibid. appendix A.1; Razavi et al. 2019): the codebook term is dropped and
    N_i <- gamma N_i + (1 - gamma) n_i,   m_i <- gamma m_i + (1 - gamma) sum_{k(z)=i} z_e,
    e_i = m_i / N~_i  with Laplace-smoothed N~_i = (N_i + eps) / (N + K eps) * N.
Cosine codes (Yu et al. 2022, ViT-VQGAN): z_e and e are l2-normalised, nearest = largest dot product.
Dead-code restart (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021): a code whose EMA count
N_i falls below a threshold is replaced by a recent encoder output.

Statistics (counts, sums, recent z_e) are gathered by forwards that train the encoder (training mode
with grad enabled; the discriminator's and evaluation's no-grad forwards do not move the codebook)
and applied by `update()`, which the task calls once per generator optimizer step: one all-reduce per
step whatever the gradient accumulation, every micro-batch counted, and the codebook moves after the
encoder it tracks. Counts and sums are summed over DDP ranks before use, and replacement vectors are
drawn on rank 0 and broadcast, so every rank holds the same codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.tokenizer.base import Quantizer, QuantizerOutput, batch_diagnostics
from components.training.distributed import all_reduce_sum, rank


class VectorQuantizer(Quantizer):
    """Nearest-code quantizer; z (B, D, h, w) -> z_q (B, D, h, w), indices (B, h, w)."""

    def __init__(
        self,
        *,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,  # commitment weight, van den Oord et al. 2017
        ema: bool = False,
        decay: float = 0.99,  # EMA decay of the codebook and of the usage counts N_i
        cosine: bool = False,
        restart_dead: bool = True,
        dead_threshold: float = 1.0,  # N_i below this (vectors per update, EMA) marks a dead code
        eps: float = 1e-5,  # Laplace smoothing
        buffer_size: int = 4096,  # recent encoder outputs kept per rank as restart candidates
    ) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.beta, self.ema, self.decay, self.cosine = beta, ema, decay, cosine
        self.restart_dead, self.dead_threshold, self.eps = restart_dead, dead_threshold, eps
        self.buffer_size = buffer_size
        init = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if cosine:
            init = F.normalize(init, dim=1)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())  # m_i, consistent with N_i = 1
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # N_i
        self.num_restarted = 0
        # Per-rank, transient: plain attributes, not buffers, which DDP would overwrite with rank 0's.
        self._counts: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None
        self._recent: torch.Tensor | None = None
        self._recent_pos = 0
        self._recent_filled = 0

    def codes(self) -> torch.Tensor:
        """The codebook e (K, D) as used for lookup (normalised for cosine codes)."""
        e = self.codebook
        return F.normalize(e, dim=1) if self.cosine and not self.ema else e

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.dim}, h, w), got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32 under mixed precision
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        z_e = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D), N = B*h*w
        if self.cosine:
            z_e = F.normalize(z_e, dim=1)
        e = self.codes()
        indices = self._nearest(z_e.detach(), e.detach())
        e_k = e[indices]  # (N, D)
        commitment = F.mse_loss(z_e, e_k.detach())
        loss = self.beta * commitment
        if not self.ema:
            loss = loss + F.mse_loss(e_k, z_e.detach())
        z_q = z_e + (e_k - z_e).detach()  # straight-through: dz_q/dz_e = I
        if self.training and torch.is_grad_enabled() and (self.ema or self.restart_dead):
            self._gather(z_e.detach(), indices)
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2)
        indices = indices.reshape(b, h, w)
        diagnostics = batch_diagnostics(indices, self.codebook_size)
        diagnostics["commitment"] = commitment.detach()
        return QuantizerOutput(z_q=z_q, loss=loss, indices=indices, diagnostics=diagnostics)

    def _nearest(self, z_e: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            return (z_e @ e.T).argmax(dim=1)
        # ||z||^2 - 2 z.e + ||e||^2 without materialising the (N, K, D) differences
        dist = z_e.pow(2).sum(1, keepdim=True) - 2 * z_e @ e.T + e.pow(2).sum(1)[None]
        return dist.argmin(dim=1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codes()[indices].permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)

    @torch.no_grad()
    def _gather(self, z_e: torch.Tensor, indices: torch.Tensor) -> None:
        """Accumulate this rank's counts, sums and recent z_e until the next `update`."""
        k, d = self.codebook_size, self.dim
        if self._counts is None or self._counts.device != z_e.device:
            self._counts = z_e.new_zeros(k)
            self._sums = z_e.new_zeros(k, d)
            self._recent = z_e.new_zeros(self.buffer_size, d)
            self._recent_pos = self._recent_filled = 0
        self._counts += torch.bincount(indices, minlength=k).float()
        if self.ema:
            self._sums.index_add_(0, indices, z_e)
        stride = -(-len(z_e) // self.buffer_size)  # evenly strided subset that fits the buffer
        new = z_e[::stride]
        slots = (self._recent_pos + torch.arange(len(new), device=z_e.device)) % self.buffer_size
        self._recent[slots] = new
        self._recent_pos = (self._recent_pos + len(new)) % self.buffer_size
        self._recent_filled = min(self.buffer_size, self._recent_filled + len(new))

    @torch.no_grad()
    def update(self) -> None:
        """EMA codebook step and dead-code restart from the statistics since the last call."""
        if not (self.ema or self.restart_dead):
            return
        k, d = self.codebook_size, self.dim
        device = self.cluster_size.device
        counts = self._counts if self._counts is not None else torch.zeros(k, device=device)
        sums = self._sums if self._sums is not None else torch.zeros(k, d, device=device)
        packed = torch.cat([counts, sums.reshape(-1)]) if self.ema else counts
        packed = all_reduce_sum(packed)  # one collective: global n_i (and sums of z_e) over ranks
        counts = packed[:k]
        self._counts = self._sums = None
        if counts.sum() == 0:  # identical on every rank after the all-reduce
            return
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.embed_sum.mul_(self.decay).add_(packed[k:].reshape(k, d), alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
            codes = self.embed_sum / smoothed[:, None]
            self.codebook.copy_(F.normalize(codes, dim=1) if self.cosine else codes)
        if self.restart_dead:
            self._restart()

    @torch.no_grad()
    def _restart(self) -> None:
        dead = self.cluster_size < self.dead_threshold  # same on every rank: N_i is all-reduced
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        new = torch.zeros_like(self.codebook.data[dead])
        if rank() == 0:
            new = self._candidates(n_dead, fallback=self.codebook.data[dead])
        new = all_reduce_sum(new)  # a broadcast from rank 0: the other ranks add zeros
        self.codebook.data[dead] = new
        self.cluster_size[dead] = self.dead_threshold
        if self.ema:
            self.embed_sum[dead] = new * self.dead_threshold  # so that m_i / N_i is the new code
        self.num_restarted += n_dead

    def _candidates(self, n: int, *, fallback: torch.Tensor) -> torch.Tensor:
        """`n` random recent encoder outputs (with replacement when fewer are stored)."""
        filled = self._recent_filled
        if self._recent is None or filled == 0:
            return fallback.clone()
        device = self._recent.device
        pick = (
            torch.randperm(filled, device=device)[:n]
            if filled >= n
            else torch.randint(filled, (n,), device=device)
        )
        return self._recent[pick].clone()
