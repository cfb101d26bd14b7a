"""PatchGAN: patch-grid shape, size check, and per-sample outputs (what makes it DDP-safe)."""

from __future__ import annotations

import pytest
import torch

from components.nn.discriminator import PatchDiscriminator

torch.set_num_threads(1)


@pytest.mark.parametrize(("n_layers", "size"), [(1, 16), (2, 16), (3, 32)])
def test_patch_logit_grid(n_layers: int, size: int) -> None:
    disc = PatchDiscriminator(in_channels=3, channels=8, n_layers=n_layers)
    out = disc(torch.randn(2, 3, size, size))
    side = size // 2**n_layers - 2
    assert out.shape == (2, 1, side, side)


def test_too_small_images_raise_naming_the_layers() -> None:
    disc = PatchDiscriminator(in_channels=1, channels=8, n_layers=3)
    with pytest.raises(ValueError, match="layers=3 needs images of at least 24 px"):
        disc(torch.randn(1, 1, 16, 16))


def test_no_batch_statistics() -> None:
    disc = PatchDiscriminator(in_channels=1, channels=8, n_layers=2)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    assert len(list(disc.buffers())) == 0
    x = torch.randn(6, 1, 16, 16)
    # a sample's logits do not depend on the rest of its batch, in train mode
    assert torch.allclose(disc(x)[:2], disc(x[:2]), atol=1e-5)
