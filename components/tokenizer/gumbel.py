"""Gumbel-softmax quantization (Jang et al. 2017; Maddison et al. 2017), as in DALL-E's dVAE.

A 1x1 conv maps z to logits over K codes; y = softmax((logits + g) / tau) with Gumbel noise g, and
z_q = sum_k y_k e_k. With `hard`, the forward uses the one-hot of argmax(y) and the backward the soft
y (straight-through). The prior is uniform, so the KL term is
    KL(q || U) = sum_k q_k log(q_k K),   q = softmax(logits),
weighted by kl_weight (5e-4 in taming-transformers' GumbelQuantize). That per-position term cannot
stop a collapse onto a few codes (measured on digits: 10% of 128 codes used), so a diversity term
pushes the batch-averaged distribution q_bar towards uniform, KL(q_bar || U) = log K - H(q_bar)
(wav2vec 2.0's codebook diversity loss, eq. 4), weighted by diversity_weight; under DDP each
rank's batch makes its own q_bar. At eval the code is the argmax of the logits, without noise, so a
tokenizer's tokens are deterministic. tau is annealed
exponentially from tau_start to tau_end (Ramesh et al. 2021, DALL-E: 1 -> 1/16); the task sets it
each step from the global step, so it needs no state to resume.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.tokenizer.base import Quantizer, QuantizerOutput, batch_diagnostics


def gumbel_tau(step: int, *, tau_start: float, tau_end: float, anneal_steps: int) -> float:
    """Exponential interpolation tau_start -> tau_end over anneal_steps, then constant."""
    t = min(max(step, 0) / max(anneal_steps, 1), 1.0)
    return tau_start * math.exp(t * math.log(tau_end / tau_start))


class GumbelQuantizer(Quantizer):
    """z (B, D, h, w) -> logits (B, K, h, w) -> z_q (B, D, h, w) from a relaxed one-hot."""

    def __init__(
        self,
        *,
        codebook_size: int,
        dim: int,
        kl_weight: float = 5e-4,
        diversity_weight: float = 0.0,
        hard: bool = False,  # soft relaxation in training, as in DALL-E's dVAE
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.kl_weight, self.diversity_weight, self.hard, self.tau = kl_weight, diversity_weight, hard, tau
        self.proj = nn.Conv2d(dim, codebook_size, 1)
        self.embed = nn.Embedding(codebook_size, dim)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"GumbelQuantizer expects (B, {self.dim}, h, w), got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):  # softmax and KL in fp32
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        logits = self.proj(z)  # (B, K, h, w)
        if self.training:
            y = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard, dim=1)
        else:
            y = F.one_hot(logits.argmax(dim=1), self.codebook_size).permute(0, 3, 1, 2).to(logits.dtype)
        indices = y.argmax(dim=1)  # (B, h, w)
        z_q = torch.einsum("bkhw,kd->bdhw", y, self.embed.weight)
        log_q = F.log_softmax(logits, dim=1)
        q = log_q.exp()
        kl = (q * (log_q + math.log(self.codebook_size))).sum(dim=1).mean()
        q_bar = q.mean(dim=(0, 2, 3))  # (K,): over the batch and positions
        diversity = math.log(self.codebook_size) + (q_bar * q_bar.clamp_min(1e-12).log()).sum()
        diagnostics = batch_diagnostics(indices, self.codebook_size)
        diagnostics["kl"] = kl.detach()
        diagnostics["diversity_kl"] = diversity.detach()
        diagnostics["tau"] = logits.new_tensor(self.tau)
        return QuantizerOutput(
            z_q=z_q,
            loss=self.kl_weight * kl + self.diversity_weight * diversity,
            indices=indices,
            diagnostics=diagnostics,
        )

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed(indices).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
