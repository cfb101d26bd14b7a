"""Glow: exact inverse, log-determinant against the autograd Jacobian, actnorm init, bits/dim, export."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.generators import load_generator
from components.training.config import LoopConfig
from components.zoo.flow import FlowConfig, FlowTask, Glow, export
from components.zoo.flow_layers import ActNorm, ClassAffine, squeeze, unsqueeze
from tests.components.zoo.zoo_util import batch, run_task

torch.set_num_threads(1)

LOOP = LoopConfig(steps=2, batch_size=4, lr=1e-3)


def _random_glow(cfg: FlowConfig, *, shape, num_classes: int) -> Glow:
    """A Glow whose every parameter (zero-initialised ones too) is random: a non-trivial bijection."""
    torch.manual_seed(0)
    flow = Glow(cfg, image_shape=shape, num_classes=num_classes).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    for m in flow.modules():
        if isinstance(m, (ActNorm, ClassAffine)):
            m.initialized.fill_(True)
    return flow


def test_squeeze_round_trip() -> None:
    x = torch.randn(2, 3, 4, 6)
    assert squeeze(x).shape == (2, 12, 2, 3)
    torch.testing.assert_close(unsqueeze(squeeze(x)), x)
    assert torch.equal(squeeze(x)[0, :4, 0, 0], x[0, 0, :2, :2].flatten())  # a 2x2 patch -> channels


@pytest.mark.parametrize(("levels", "class_affine"), [(1, False), (2, False), (2, True)])
def test_inverse_and_log_determinant_match_autograd(levels, class_affine) -> None:
    cfg = FlowConfig(levels=levels, steps_per_level=2, hidden_channels=8, class_affine=class_affine)
    flow = _random_glow(cfg, shape=(1, 4, 4), num_classes=2)
    y = torch.tensor([1])
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 2 - 1
    zs, logdet, _ = flow(x, y)
    logdet = logdet.detach()
    torch.testing.assert_close(flow.invert(zs, y), x)

    def f(flat: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten() for z in flow(flat.view(1, 1, 4, 4), y)[0]])

    jac = torch.autograd.functional.jacobian(f, x.flatten())  # (16, 16)
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac).logabsdet)
    assert abs(logdet.item()) > 0.1  # a non-trivial map


def test_a_runaway_inverse_samples_finite_images() -> None:
    """A coupling whose scale underflows to 0 for what it is given (as the glyph flow's finest level
    did for some latents at T = 0.5) divides by zero on the way back: sampling still gives finite
    images in [-1, 1], while the exact inverse stays exact."""
    cfg = FlowConfig(levels=2, steps_per_level=2, hidden_channels=8)
    flow = _random_glow(cfg, shape=(3, 8, 8), num_classes=3).eval()
    coupling = flow.levels[0][1].coupling
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    zs, _, _ = flow(x, y)
    torch.testing.assert_close(flow.invert(zs, y), x)
    flow, zs = flow.float(), [z.float() for z in zs]
    with torch.no_grad():
        coupling.conv_out.bias[coupling.conv_out.bias.shape[0] // 2 :] = -300.0  # sigmoid(s + 2) == 0
    assert not torch.isfinite(flow.invert(zs, y)).all()  # the plain inverse runs away
    images = flow.sample(y, n=6, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(images).all() and images.abs().max() <= 1


def test_actnorm_initialises_from_the_first_batch() -> None:
    norm = ActNorm(3)
    x = torch.randn(64, 3, 4, 4) * torch.tensor([2.0, 0.5, 1.0])[:, None, None] + 3
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    before = norm.bias.detach().clone()
    norm(x + 10)  # initialised once only
    assert torch.equal(norm.bias, before) and bool(norm.initialized)


def test_class_affine_initialises_to_the_first_batchs_class_means() -> None:
    layer = ClassAffine((1, 2, 2), rows=4)  # 3 classes + "no label"
    x = torch.randn(6, 1, 2, 2)
    y = torch.tensor([0, 0, 1, 1, 1, 3])  # class 2 absent: it starts from the batch mean
    out, logdet = layer(x, y)
    torch.testing.assert_close(layer.bias[0], -x[:2].mean(0))
    torch.testing.assert_close(layer.bias[1], -x[2:5].mean(0))
    torch.testing.assert_close(layer.bias[2], -x.mean(0))
    torch.testing.assert_close(out[:2].mean(0), torch.zeros(1, 2, 2), atol=1e-6, rtol=0)
    assert torch.equal(logdet, torch.zeros(6))
    before = layer.bias.detach().clone()
    layer(x + 1, y)  # initialised once only
    assert torch.equal(layer.bias, before)
    with torch.no_grad():
        layer.log_scale.add_(0.3 * torch.randn_like(layer.log_scale))
    out, logdet = layer(x, y)
    torch.testing.assert_close(layer.inverse(out, y), x)
    torch.testing.assert_close(logdet, layer.log_scale[y].flatten(1).sum(1))


def test_log_determinant_at_init_is_the_couplings_sigmoid_2() -> None:
    # Actnorm not yet initialised (identity), 1x1 convs orthogonal (|det| = 1), couplings zero-initialised:
    # each scales its second half by sigmoid(2). (1, 4, 4): 8 dims at level 1, 4 of the kept 8 at level 2.
    flow = Glow(
        FlowConfig(levels=2, steps_per_level=1, hidden_channels=4), image_shape=(1, 4, 4), num_classes=0
    )
    flow.eval()
    x = torch.randn(3, 1, 4, 4)
    zs, logdet, log_pz = flow(x, None)
    torch.testing.assert_close(
        logdet, torch.full((3,), 12 * math.log(torch.sigmoid(torch.tensor(2.0)).item()))
    )
    flat = torch.cat([z.flatten(1) for z in zs], dim=1)  # priors are N(0, I) at init
    torch.testing.assert_close(log_pz, -0.5 * (16 * math.log(2 * math.pi) + flat.pow(2).sum(1)))


@pytest.mark.parametrize(("shape", "num_classes"), [((1, 8, 8), 3), ((3, 8, 8), 0)])
def test_task_trains_and_round_trips(tmp_path, shape, num_classes) -> None:
    cfg = FlowConfig(levels=2, steps_per_level=2, hidden_channels=8)
    task = FlowTask(cfg, LOOP, image_shape=shape, num_classes=num_classes)
    sink = run_task(task, steps=3, data=batch(8, shape=shape, num_classes=num_classes))
    last = sink.rows[-1]
    assert math.isfinite(last["main/loss"]) and math.isfinite(last["val/bpd"])
    assert 0 < last["val/bpd"] < 30
    assert task.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, *shape)

    export(
        tmp_path / "flow",
        state=task.modules["flow"].state_dict(),
        config=cfg,
        image_shape=shape,
        num_classes=num_classes,
    )
    gen = load_generator(tmp_path / "flow")
    assert gen.num_classes == num_classes and gen.image_shape == shape
    assert gen.default_options == {"temperature": 0.7}
    labels = torch.tensor([2, 0, 1]) if num_classes else 3
    a = gen.sample(labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, gen.sample(labels, generator=torch.Generator().manual_seed(5)))
    assert a.shape == (3, *shape) and a.min() >= -1 and a.max() <= 1
    images = batch(2, shape=shape)["image"]
    bpd = gen.bits_per_dim(images, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()


def test_bad_configs_are_one_line() -> None:
    with pytest.raises(ValidationError, match="extra"):
        FlowConfig(level=2)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        FlowConfig(steps_per_level=0)
    with pytest.raises(
        ValueError, match=r"^flow: image size 12x12 must be a multiple of 8 \(levels=3 squeezes\)$"
    ):
        FlowTask(FlowConfig(levels=3), LOOP, image_shape=(1, 12, 12), num_classes=0)
