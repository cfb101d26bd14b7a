"""Tiny priors, a learnable synthetic token distribution and a tiny exported VQGAN for the prior tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from components.io import save_model
from components.prior.config import GPTConfig, MaskGITConfig, PriorConfig
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.vqgan import VQGAN

torch.set_num_threads(1)

TINY = dict(layers=2, heads=2, width=32, dropout=0.0)


def tiny_prior(kind: str, **overrides) -> PriorConfig:
    """A 2-layer, 32-wide prior of `kind`."""
    return PriorConfig(
        kind=kind,
        gpt=GPTConfig(**TINY),
        maskgit=MaskGITConfig(**TINY),
        **{"label_dropout": 0.0, **overrides},
    )


def chain_tokens(n: int, *, grid: tuple[int, int], codebook_size: int, num_classes: int, seed: int = 0):
    """A learnable distribution: t_0 = label (or uniform when unconditional), t_i = (t_{i-1} + 1) mod K."""
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    if num_classes:
        label = torch.randint(0, num_classes, (n,), generator=g)
        start = label
    else:
        label = torch.full((n,), -1)
        start = torch.randint(0, codebook_size, (n,), generator=g)
    tokens = (start[:, None] + torch.arange(N)) % codebook_size
    return {"tokens": tokens.view(n, *grid), "latent": torch.zeros(n, 2, *grid), "label": label}


def batches_of(data: dict[str, torch.Tensor], *, batch_size: int):
    """batches(epoch): shuffled micro-batches whose order depends only on the epoch (no global RNG)."""
    n = len(data["label"])

    def batches(epoch: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield {k: v[idx] for k, v in data.items()}

    return batches


def tiny_vqgan(path: Path, *, codebook_size: int = 16) -> Path:
    """Export a randomly initialised VQGAN (1 channel, f = 4: 16x16 images <-> 4x4 grids) to `path`."""
    cfg = TokenizerConfig(
        autoencoder=dict(
            in_channels=1,
            channels=8,
            channel_mult=(1, 2, 2),
            downsample_factor=4,
            num_res_blocks=1,
            z_channels=8,
            attention=False,
        ),
        quantizer={"kind": "vq", "codebook_size": codebook_size, "code_dim": 4},
        loss={"perceptual_weight": 0.0, "disc": {"weight": 0.0}},
    )
    torch.manual_seed(0)
    vqgan = VQGAN(cfg)
    save_model(path, vqgan.state_dict(), vqgan.config_dict())
    return path


@pytest.fixture
def helpers():
    """This module, for tests that need its builders."""
    return sys.modules[__name__]
