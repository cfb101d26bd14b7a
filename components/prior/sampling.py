"""Pieces shared by the priors' samplers: logit filtering, guidance, and MaskGIT's mask schedules.

Top-k (Fan et al. 2018) keeps the k largest logits; top-p / nucleus sampling (Holtzman et al. 2020,
eq. 2-3) keeps the smallest set V_p of most likely tokens with sum_{x in V_p} p(x) >= p.
Classifier-free guidance (Ho & Salimans 2022, eq. 6, with w = 1 + their w) on logits:
l = l_u + w * (l_c - l_u), so w = 1 is the conditional model and w = 0 the unconditional one.
Mask schedules gamma(r) (Chang et al. 2022, sec. 3.3) give the masked share at progress r in [0, 1],
decreasing from gamma(0) = 1 to gamma(1) = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MASK_SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cosine": lambda r: torch.cos(r * (math.pi / 2)),
    "linear": lambda r: 1.0 - r,
    "square": lambda r: 1.0 - r * r,
}


def mask_ratio(r: torch.Tensor | float, *, schedule: str) -> torch.Tensor:
    """gamma(r): the share of tokens masked at progress r in [0, 1]; 1 at r=0, 0 at r=1."""
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"unknown mask schedule {schedule!r}; valid: {', '.join(MASK_SCHEDULES)}")
    r = torch.as_tensor(r, dtype=torch.float64)
    # cos(pi/2) is 6e-17, not 0: clamp so that every schedule ends exactly at 0
    return MASK_SCHEDULES[schedule](r).clamp(0.0, 1.0).where(r < 1, torch.zeros_like(r))


def top_k_filter(logits: torch.Tensor, *, k: int | None) -> torch.Tensor:
    """Logits (..., V) with all but exactly the k largest set to -inf; None, 0 or k >= V: unchanged."""
    if not k or k >= logits.shape[-1]:
        return logits
    # scatter the top-k indices rather than compare to the k-th value, so ties keep exactly k
    idx = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, *, p: float) -> torch.Tensor:
    """Logits (..., V) outside the nucleus set to -inf: the smallest set with mass >= p (at least top-1)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p={p} must lie in (0, 1]")
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # a token is in the nucleus iff the mass strictly before it is below p; the top-1 always is
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def filter_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as in the usual sampling loop (nanoGPT, HF)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    logits = logits / temperature
    return top_p_filter(top_k_filter(logits, k=top_k), p=top_p)


def guide(logits: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a (2B, ...) batch of [conditional; unconditional] logits -> (B, ...)."""
    l_c, l_u = logits.chunk(2)
    return l_u + scale * (l_c - l_u)


def guidance_classes(
    labels: torch.Tensor | int, *, num_classes: int, guidance: float, device: torch.device
) -> tuple[torch.Tensor, bool]:
    """Class ids for the forward pass and whether it is guided: [labels; null] (2B,) when guidance != 1.

    `labels` (B,) in [0, num_classes), or an int B for B unconditional samples (the null class
    num_classes): those have no condition to guide, so guidance is an error only for a model that
    has no classes at all.
    """
    if guidance < 0:
        raise ValueError(f"guidance={guidance} must be >= 0 (1: plain conditional)")
    if isinstance(labels, int):
        if num_classes == 0 and guidance != 1.0:
            raise ValueError(
                f"guidance={guidance} needs a class-conditional model; this one has num_classes=0"
            )
        return torch.full((labels,), num_classes, dtype=torch.long, device=device), False
    labels = labels.to(device=device, dtype=torch.long)
    if labels.ndim != 1 or (labels.numel() and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(
            f"labels must be a 1-D tensor of classes in [0, {num_classes}); use an int for unconditional"
        )
    if guidance == 1.0:
        return labels, False
    return torch.cat([labels, torch.full_like(labels, num_classes)]), True


def sample_logits(logits: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """One draw from softmax(logits) (B, V) -> (B,) int64, randomness from `generator` only."""
    return torch.multinomial(logits.float().softmax(dim=-1), 1, generator=generator).squeeze(-1)
