"""The conditioned UNet: shapes, conditioning paths, zero-init identity, bad inputs, and that it learns."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.nn.unet import UNet, UNetConfig, noise_features

torch.set_num_threads(1)
SMALL = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,))


def _randomised(net: UNet) -> UNet:
    """Perturb every parameter: zero-initialised layers would hide whether a path is wired."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("noise_embedding", ["positional", "fourier"])
@pytest.mark.parametrize(
    ("in_channels", "size", "mult", "attention"),
    [(1, 16, (1, 2, 2), (2,)), (3, 32, (1, 2, 2, 2), (2, 3)), (4, 8, (1, 2), ())],
)
def test_output_shape_is_the_input_shape(noise_embedding, in_channels, size, mult, attention):
    cfg = UNetConfig(
        in_channels=in_channels,
        channels=8,
        channel_mult=mult,
        attention_levels=attention,
        num_classes=3,
        noise_embedding=noise_embedding,
    )
    x = torch.randn(2, in_channels, size, size)
    out = UNet(cfg)(x, torch.tensor([0.3, -1.2]), torch.tensor([0, 3]))
    assert out.shape == x.shape
    assert out.abs().max() == 0  # zero-initialised output layer: an untrained denoiser predicts 0


def test_every_parameter_gets_a_gradient():
    net = _randomised(UNet(UNetConfig(num_classes=4, **SMALL)))
    net(torch.randn(3, 1, 8, 8), torch.randn(3), torch.tensor([0, 1, 4])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_noise_level_and_label_change_the_output_and_none_is_the_empty_class():
    net = _randomised(UNet(UNetConfig(num_classes=4, **SMALL))).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        base = net(x, c, torch.tensor([1, 1]))
        assert not torch.allclose(base, net(x, c + 1, torch.tensor([1, 1])))
        assert not torch.allclose(base, net(x, c, torch.tensor([2, 2])))
        torch.testing.assert_close(net(x, c, None), net(x, c, torch.tensor([4, 4])))
        torch.testing.assert_close(net(x, torch.tensor(0.5), torch.tensor([1, 1])), base)  # scalar c_noise


def test_positional_features_are_unit_cos_sin_pairs():
    f = noise_features(torch.tensor([0.0, 2.5]), 16, kind="positional")
    assert f.shape == (2, 16)
    torch.testing.assert_close(f[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    torch.testing.assert_close(f[:, :8] ** 2 + f[:, 8:] ** 2, torch.ones(2, 8))


def test_bad_inputs_name_the_problem():
    net = UNet(UNetConfig(num_classes=4, **SMALL))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(1, 1, 7, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"labels must be \(B,\) = \(1,\) in \[0, 4\]"):
        net(torch.randn(1, 1, 8, 8), torch.zeros(1), torch.tensor([5]))
    with pytest.raises(ValueError, match="c_noise must be a scalar or"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional UNet"):
        UNet(UNetConfig(**SMALL))(torch.randn(1, 1, 8, 8), torch.zeros(1), torch.tensor([0]))
    with pytest.raises(ValidationError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))


def test_it_learns_a_class_conditional_denoiser():
    # Two classes, each one fixed image: from pure noise, the label alone says which to predict.
    torch.manual_seed(0)
    net = UNet(UNetConfig(num_classes=2, **SMALL))
    targets = torch.randn(2, 1, 8, 8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        y = torch.randint(0, 2, (16,))
        loss = (net(torch.randn(16, 1, 8, 8), torch.zeros(16), y) - targets[y]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.1 * sum(losses[:10]) / 10
