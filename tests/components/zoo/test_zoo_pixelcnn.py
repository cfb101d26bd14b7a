"""PixelCNN: causality (no blind spot), cached sampling = forward, uniform = 8 bits, training, export."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.generators import load_generator
from components.training.config import LoopConfig
from components.zoo.pixelcnn import PixelCNN, PixelCNNConfig, PixelCNNTask, export
from tests.components.zoo.zoo_util import batch, images, run_task

torch.set_num_threads(1)

TINY = PixelCNNConfig(channels=8, layers=3, first_kernel=3, kernel=3)
MAPPED = PixelCNNConfig(channels=8, layers=3, first_kernel=3, kernel=3, class_map_channels=2)


def _randomise_maps(net: PixelCNN) -> PixelCNN:
    """Non-zero class maps (they start at zero), so the tests see them."""
    if net.class_map is not None:
        with torch.no_grad():
            net.class_map.normal_()
    return net


LOOP = LoopConfig(steps=2, batch_size=4, lr=1e-3)


@pytest.mark.parametrize(("channels", "cfg"), [(1, TINY), (2, TINY), (1, MAPPED)])
def test_a_pixel_depends_on_every_earlier_pixel_and_nothing_else(channels, cfg) -> None:
    torch.manual_seed(0)
    net = _randomise_maps(PixelCNN(cfg, image_shape=(channels, 5, 5), num_classes=3))
    x = torch.randn(1, channels, 5, 5, requires_grad=True)
    i, j = 3, 2
    net(x, torch.tensor([1]))[0, :, :, i, j].sum().backward()  # every level, every channel of (i, j)
    dep = x.grad[0].abs().sum(0) > 0  # (5, 5)
    earlier = torch.arange(25).view(5, 5) < i * 5 + j  # raster order
    assert torch.equal(dep, earlier)  # includes (i - 1, j + 1): the plain PixelCNN's blind spot


@pytest.mark.parametrize(("cfg", "num_classes"), [(TINY, 3), (MAPPED, 3), (MAPPED, 0)])
def test_cached_generation_equals_the_forward_pass(cfg, num_classes) -> None:
    torch.manual_seed(0)
    net = _randomise_maps(PixelCNN(cfg, image_shape=(2, 5, 6), num_classes=num_classes)).eval()
    x = images(3, shape=(2, 5, 6))
    y = torch.tensor([0, 3, 2]) if num_classes else None
    full = net(x, y)
    seen = torch.zeros_like(full)

    def teacher(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        seen[:, :, :, i, j] = logits
        return x[:, :, i, j]

    assert torch.equal(net.generate(y, n=3, choose=teacher), x)
    torch.testing.assert_close(seen, full, atol=1e-5, rtol=1e-5)


def test_constant_images_reach_near_zero_bits_per_dim() -> None:
    torch.manual_seed(0)
    loop = LoopConfig(steps=1, batch_size=4, lr=0.02)
    task = PixelCNNTask(TINY, loop, image_shape=(1, 4, 4), num_classes=0)
    data = {"image": torch.full((8, 1, 4, 4), 100 / 127.5 - 1), "label": torch.full((8,), -1)}
    sink = run_task(task, steps=30, data=data)
    assert sink.rows[0]["main/bpd"] > 6  # ~8 bits at init
    assert sink.rows[-1]["val/bpd"] < 0.3


def test_uniform_logits_give_eight_bits(tmp_path) -> None:
    net = PixelCNN(TINY, image_shape=(3, 4, 4), num_classes=2)
    torch.nn.init.zeros_(net.head[-1].weight)
    torch.nn.init.zeros_(net.head[-1].bias)
    export(tmp_path / "p", state=net.state_dict(), config=TINY, image_shape=(3, 4, 4), num_classes=2)
    gen = load_generator(tmp_path / "p")
    bpd = gen.bits_per_dim(images(3, shape=(3, 4, 4)), generator=torch.Generator())
    torch.testing.assert_close(bpd, torch.full((3,), 8.0))


@pytest.mark.parametrize(
    ("shape", "num_classes", "cfg"), [((1, 6, 6), 3, TINY), ((3, 4, 4), 0, TINY), ((1, 6, 6), 3, MAPPED)]
)
def test_task_trains_and_round_trips(tmp_path, shape, num_classes, cfg) -> None:
    task = PixelCNNTask(cfg, LOOP, image_shape=shape, num_classes=num_classes)
    sink = run_task(task, steps=3, data=batch(8, shape=shape, num_classes=num_classes))
    assert math.isfinite(sink.rows[-1]["main/loss"]) and 7 < sink.rows[-1]["val/bpd"] < 9
    assert task.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, *shape)

    export(
        tmp_path / "pixelcnn",
        state=task.modules["pixelcnn"].state_dict(),
        config=cfg,
        image_shape=shape,
        num_classes=num_classes,
        temperature=0.9,
    )
    gen = load_generator(tmp_path / "pixelcnn")
    assert gen.num_classes == num_classes and gen.image_shape == shape
    assert gen.default_options == {"temperature": 0.9}
    labels = torch.tensor([1, 0, 2]) if num_classes else 3
    a = gen.sample(labels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, gen.sample(labels, generator=torch.Generator().manual_seed(2)))
    assert a.shape == (3, *shape) and a.min() >= -1 and a.max() <= 1
    levels = (a + 1) * 127.5
    torch.testing.assert_close(levels, levels.round())  # on the 8-bit grid
    bpd = gen.bits_per_dim(a, generator=torch.Generator())
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()


def test_bad_configs_are_one_line() -> None:
    with pytest.raises(ValidationError, match="kernel size 4 must be odd"):
        PixelCNNConfig(kernel=4)
    with pytest.raises(ValidationError, match="extra"):
        PixelCNNConfig(gated=False)
    with pytest.raises(ValueError, match=r"^num_classes=-1 must be >= 0 \(0: unconditional\)$"):
        PixelCNNTask(TINY, LOOP, image_shape=(1, 4, 4), num_classes=-1)
