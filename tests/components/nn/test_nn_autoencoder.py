"""Encoder/decoder shapes per downsampling factor, blocks' invariants, config validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.nn.autoencoder import AutoencoderConfig, Decoder, Encoder
from components.nn.blocks import AttnBlock, ResBlock, group_norm

torch.set_num_threads(1)


def _config(f: int, **kw) -> AutoencoderConfig:
    levels = {2: (1, 2), 4: (1, 2, 2), 8: (1, 1, 2, 2), 16: (1, 1, 1, 2, 2)}[f]
    base = dict(
        in_channels=3, channels=8, channel_mult=levels, downsample_factor=f, num_res_blocks=1, z_channels=6
    )
    return AutoencoderConfig(**{**base, **kw})


@pytest.mark.parametrize("channels", [8, 12, 20, 48, 64, 96])
def test_group_norm_groups_divide_channels(channels: int) -> None:
    norm = group_norm(channels)
    assert channels % norm.num_groups == 0
    assert norm.num_groups <= 32


@pytest.mark.parametrize("f", [2, 4, 8, 16])
@pytest.mark.parametrize("attention", [True, False])
def test_encoder_decoder_shapes(f: int, attention: bool) -> None:
    cfg = _config(f, attention=attention)
    x = torch.randn(2, 3, 32, 32)
    z = Encoder(cfg)(x)
    assert z.shape == (2, 6, 32 // f, 32 // f)
    decoder = Decoder(cfg)
    assert decoder(z).shape == x.shape


def test_last_layer_is_the_output_conv_weight() -> None:
    decoder = Decoder(_config(4))
    assert decoder.last_layer is decoder.conv_out.weight
    out = decoder(torch.randn(1, 6, 4, 4)).sum()
    (grad,) = torch.autograd.grad(out, decoder.last_layer)
    assert grad.abs().sum() > 0


def test_inconsistent_downsample_factor_names_both_fields() -> None:
    with pytest.raises(ValidationError, match=r"channel_mult=\[1, 2\].*downsample_factor=8"):
        AutoencoderConfig(channel_mult=(1, 2), downsample_factor=8)
    with pytest.raises(ValidationError, match="not one of"):
        AutoencoderConfig(channel_mult=(1,) * 6, downsample_factor=32)


def test_encoder_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match="not divisible by downsample_factor=4"):
        Encoder(_config(4))(torch.randn(1, 3, 18, 18))


def test_attention_is_equivariant_to_position_permutations() -> None:
    block = AttnBlock(16).eval()
    x = torch.randn(2, 16, 4, 4)
    perm = torch.randperm(16)
    flat = x.flatten(2)
    y_perm = block(flat[:, :, perm].reshape(2, 16, 4, 4)).flatten(2)
    assert torch.allclose(y_perm, block(x).flatten(2)[:, :, perm], atol=1e-5)


def test_resblock_skip_projects_when_channels_change() -> None:
    assert isinstance(ResBlock(8, 8).skip, torch.nn.Identity)
    block = ResBlock(8, 16, dropout=0.1)
    assert block(torch.randn(2, 8, 5, 5)).shape == (2, 16, 5, 5)
