"""Autoregressive prior over token grids: the transformer of "Taming Transformers" (Esser et al. 2021,
sec. 3.2, eq. 8-10), a decoder-only GPT (Radford et al. 2019).

p(s | c) = prod_i p(s_i | s_<i, c) over the row-major token grid s (N = h * w tokens), class c as a
token prepended to the sequence (the null class for unconditional / guided sampling). Training
minimises the next-token cross-entropy -log p(s); sampling draws s_i one at a time, optionally with a
KV cache, temperature, top-k, top-p and classifier-free guidance (Ho & Salimans 2022, eq. 6).
"""

from __future__ import annotations

import torch
from torch import nn

from components.prior.config import GPTConfig
from components.prior.sampling import filter_logits, guidance_classes, guide, sample_logits
from components.prior.transformer import KVCache, Transformer, eval_mode


class GPT(nn.Module):
    """Causal transformer: tokens (B, N) and classes (B,) -> next-token logits (B, N, K)."""

    def __init__(self, config: GPTConfig, *, num_tokens: int, codebook_size: int, num_classes: int) -> None:
        super().__init__()
        self.config, self.num_tokens, self.codebook_size = config, num_tokens, codebook_size
        self.num_classes = num_classes
        # positions: the class token, then tokens 0..N-2 (the last token is only ever a target)
        self.net = Transformer(
            config,
            vocab_size=codebook_size,
            out_size=codebook_size,
            seq_len=num_tokens,
            num_classes=num_classes,
        )

    def forward(self, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, K) where position i predicts tokens[:, i] from the class and tokens[:, :i]."""
        return self.net.run(tokens[:, :-1], classes, causal=True)


@torch.no_grad()
def generate(
    model: GPT,
    labels: torch.Tensor | int,
    *,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    guidance: float = 1.0,
    use_cache: bool = True,
) -> torch.Tensor:
    """Token sequences (B, N) int64 for labels (B,) in [0, num_classes), or `labels` unconditional ones.

    guidance == 1 samples the conditional model alone; otherwise conditional and null-class logits
    come from one 2B forward and combine as l_u + w (l_c - l_u). Unconditional samples have no
    condition to guide. Randomness comes from `generator` only (one multinomial draw per position).
    """
    with eval_mode(model):  # dropout off: cached and uncached paths compute the same function
        device = model.net.pos_emb.device
        classes, guided = guidance_classes(
            labels, num_classes=model.num_classes, guidance=guidance, device=device
        )
        n = classes.shape[0] // 2 if guided else classes.shape[0]
        tokens = torch.empty(classes.shape[0], 0, dtype=torch.long, device=device)
        cache = KVCache(max_len=model.num_tokens) if use_cache else None
        for i in range(model.num_tokens):
            if cache is None:  # the whole prefix again
                logits = model.net.run(tokens, classes, causal=True)[:, -1]
            elif i == 0:  # the class token fills the cache
                logits = model.net.run(tokens, classes, causal=True, cache=cache)[:, -1]
            else:  # only the newest token; earlier keys and values come from the cache
                logits = model.net.run(tokens[:, -1:], None, causal=True, cache=cache)[:, -1]
            if guided:
                logits = guide(logits, scale=guidance)
            logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            nxt = sample_logits(logits, generator=generator)  # (n,)
            if guided:
                nxt = nxt.repeat(2)  # the conditional and the null half continue the same sequence
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return tokens[:n]
