"""Masked generative image transformer: MaskGIT (Chang et al. 2022, sec. 3).

Training (sec. 3.1, eq. 1): draw r ~ U[0, 1), mask n = ceil(gamma(r) * N) of the N tokens uniformly
at random (the [MASK] token has index K), and minimise the cross-entropy on the masked positions only,
L = -E[sum_{i masked} log p(y_i | y_masked, c)], with a bidirectional transformer.
Decoding (sec. 3.2): start fully masked; at step t = 1..T predict every masked token, sample it,
score it by confidence = log p(sampled) + tau_t * Gumbel with tau_t = choice_temperature * (1 - t/T)
(the reference code's annealed noise), and re-mask the n_t = floor(gamma(t/T) * N) least confident
of the tokens sampled this step (floor, as the reference decoder). Tokens kept earlier are never
re-masked; gamma(1) = 0 fills every position at t = T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.prior.config import MaskGITConfig
from components.prior.sampling import filter_logits, guidance_classes, guide, mask_ratio
from components.prior.transformer import Transformer, eval_mode


class MaskGIT(nn.Module):
    """Bidirectional transformer: tokens (B, N) with [MASK] = K and classes (B,) -> logits (B, N, K)."""

    def __init__(
        self, config: MaskGITConfig, *, num_tokens: int, codebook_size: int, num_classes: int
    ) -> None:
        super().__init__()
        self.config, self.num_tokens, self.codebook_size = config, num_tokens, codebook_size
        self.num_classes = num_classes
        self.net = Transformer(
            config,
            vocab_size=codebook_size + 1,  # the codes and [MASK]
            out_size=codebook_size,  # [MASK] is never a target
            seq_len=num_tokens + 1,  # the class token, then every grid position
            num_classes=num_classes,
        )

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    def forward(self, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, K) for every position of `tokens` (B, N)."""
        return self.net.run(tokens, classes, causal=False)[:, 1:]


def num_masked(t: int, *, steps: int, num_tokens: int, schedule: str) -> int:
    """n_t = floor(gamma(t / T) * N): tokens still masked after decoding step t of T (N at t = 0, 0 at t = T)."""
    # floor, as MaskGIT's reference decoder, not the ceil of training: with ceil the first of 8 steps
    # over 16 tokens would keep all 16 masked (ceil(16 cos(pi/16)) = 16) and decode nothing
    return math.floor(float(mask_ratio(t / steps, schedule=schedule)) * num_tokens)


def random_mask(
    tokens: torch.Tensor, *, schedule: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training mask (B, N) bool: per sample r ~ U[0, 1), ceil(gamma(r) N) >= 1 positions at random."""
    B, N = tokens.shape
    r = torch.rand(B, generator=generator, device=tokens.device)
    n = torch.ceil(mask_ratio(r, schedule=schedule) * N).long().clamp(1, N).to(tokens.device)  # (B,)
    # rank of each position under random scores: the n lowest-ranked positions are masked
    rank = torch.rand(B, N, generator=generator, device=tokens.device).argsort(dim=1).argsort(dim=1)
    return rank < n[:, None]


def masked_loss(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Mean cross-entropy, accuracy) over the masked positions of logits (B, N, K), tokens (B, N)."""
    logits, targets = logits[mask], tokens[mask]  # (M, K), (M,)
    loss = F.cross_entropy(logits.float(), targets)
    return loss, (logits.argmax(dim=-1) == targets).float().mean()


@torch.no_grad()
def generate(
    model: MaskGIT,
    labels: torch.Tensor | int,
    *,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    guidance: float = 1.0,
    steps: int = 8,
    choice_temperature: float = 4.5,
    return_history: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token sequences (B, N) int64 by iterative parallel decoding in `steps` steps.

    With `return_history`, also the sequence after each step (steps, B, N), [MASK] (= K) where masked.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if choice_temperature < 0:
        raise ValueError(f"choice_temperature={choice_temperature} must be >= 0")
    with eval_mode(model):
        device = model.net.pos_emb.device
        classes, guided = guidance_classes(
            labels, num_classes=model.num_classes, guidance=guidance, device=device
        )
        n = classes.shape[0] // 2 if guided else classes.shape[0]
        x = torch.full((n, model.num_tokens), model.mask_id, dtype=torch.long, device=device)
        history = []
        for t in range(1, steps + 1):
            logits = model(torch.cat([x, x]) if guided else x, classes)  # (B or 2B, N, K)
            if guided:
                logits = guide(logits, scale=guidance)
            x = _decode_step(
                x, logits, t=t, steps=steps, schedule=model.config.mask_schedule, generator=generator,
                temperature=temperature, top_k=top_k, top_p=top_p, choice_temperature=choice_temperature,
            )  # fmt: skip
            history.append(x)
        return (x, torch.stack(history)) if return_history else x


def _decode_step(
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    t: int,
    steps: int,
    schedule: str,
    generator: torch.Generator,
    temperature: float,
    top_k: int | None,
    top_p: float,
    choice_temperature: float,
) -> torch.Tensor:
    """One decoding step: sample every masked position, keep the confident ones, re-mask the rest."""
    B, N, K = logits.shape
    mask_id = K
    unknown = x == mask_id  # (B, N)
    # Step 1: sample a candidate at every position
    logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).float()
    probs = logits.softmax(dim=-1).reshape(B * N, K)
    sampled = torch.multinomial(probs, 1, generator=generator).reshape(B, N)
    sampled = torch.where(unknown, sampled, x)  # kept tokens stay as they are
    # Step 2: how many stay masked after this step, from the schedule
    n_mask = num_masked(t, steps=steps, num_tokens=N, schedule=schedule)
    if n_mask == 0:
        return sampled
    # Step 3: confidence with annealed Gumbel noise; kept tokens get +inf so they are never re-masked
    log_p = logits.log_softmax(dim=-1).gather(-1, sampled[..., None]).squeeze(-1)  # (B, N)
    u = torch.rand(B, N, generator=generator, device=x.device).clamp_(1e-20, 1.0)
    gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))  # Gumbel(0, 1), finite
    confidence = log_p + choice_temperature * (1.0 - t / steps) * gumbel
    confidence = confidence.masked_fill(~unknown, math.inf)
    # Step 4: re-mask the n_mask least confident positions (all of them were unknown before this step)
    remask = torch.zeros_like(unknown).scatter_(
        1, confidence.topk(n_mask, dim=1, largest=False).indices, True
    )
    return sampled.masked_fill(remask, mask_id)
