"""The pre-norm transformer both priors share (GPT-2, Radford et al. 2019; nanoGPT's layout).

Block: x = x + Attn(LN(x)); x = x + MLP(LN(x)). Attention is softmax(q k^T / sqrt(d)) v through
torch's scaled_dot_product_attention, causal for the GPT and bidirectional for MaskGIT. A `KVCache`
keeps each layer's keys and values (B, H, T, d) so that the GPT samples one new token per forward.
The sequence is [class token, token_0, ...]: class index `num_classes` is the null class of
classifier-free guidance, and an unconditional model (num_classes = 0) has only that one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from components.prior.config import TransformerConfig


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) for sampling, restoring the previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class KVCache:
    """Keys and values per layer for up to `max_len` positions; `length` positions are filled."""

    max_len: int
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, max_len, d)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, d) after the filled positions; all keys and values so far."""
        if layer not in self.k:  # allocated at the first write, in the dtype autocast gives k and v
            B, H, _, d = k.shape
            self.k[layer] = k.new_zeros(B, H, self.max_len, d)
            self.v[layer] = v.new_zeros(B, H, self.max_len, d)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention; with a cache, the new positions attend to everything before them."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.dropout = config.heads, config.dropout
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, *, causal: bool, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, H, T, d)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if cache is not None:
            start = cache.length
            k, v = cache.append(layer, k, v)
            if causal and T > 1:  # query i sits at position start + i and sees keys 0..start + i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            causal = False  # a single new query may see the whole cache
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, d) -> (B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm residual block: attention, then a GELU MLP."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.width
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, hidden),
            nn.GELU(),
            nn.Linear(hidden, config.width),
            nn.Dropout(config.dropout),
        )

    def forward(
        self, x: torch.Tensor, *, causal: bool, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, cache=cache, layer=layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Token, class and position embeddings, the blocks, a final LayerNorm and the output head."""

    def __init__(
        self, config: TransformerConfig, *, vocab_size: int, out_size: int, seq_len: int, num_classes: int
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")
        self.config, self.seq_len, self.num_classes = config, seq_len, num_classes
        self.tok_emb = nn.Embedding(vocab_size, config.width)
        self.cls_emb = nn.Embedding(num_classes + 1, config.width)  # index num_classes: the null class
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len, config.width))  # class token at position 0
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, out_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2L)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.layers))
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def run(
        self,
        tokens: torch.Tensor,
        classes: torch.Tensor | None,
        *,
        causal: bool,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T', out_size) of [class token; tokens (B, T)], or of `tokens` after a cached prefix.

        `classes` (B,) class ids prepend the class token (T' = T + 1); None continues a cached sequence.
        """
        x = self.tok_emb(tokens)  # (B, T) -> (B, T, C)
        if classes is not None:
            x = torch.cat([self.cls_emb(classes)[:, None], x], dim=1)
        start = cache.length if cache is not None else 0
        if start + x.shape[1] > self.seq_len:
            raise ValueError(f"sequence of {start + x.shape[1]} positions exceeds seq_len={self.seq_len}")
        x = self.drop(x + self.pos_emb[:, start : start + x.shape[1]])
        for i, block in enumerate(self.blocks):
            x = block(x, causal=causal, cache=cache, layer=i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.ln_f(x))
