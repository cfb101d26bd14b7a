"""Training-curve PNGs: one panel per metric family present, atomic write, an image even when empty."""

from __future__ import annotations

import pytest
from PIL import Image

from components.evaluation.curves import _panels, plot_curves


def _rows(keys: list[str]) -> dict[int, dict[str, float]]:
    return {s: {k: 1.0 / (1 + s) + i for i, k in enumerate(keys)} for s in range(0, 100, 10)}


@pytest.mark.parametrize(
    ("keys", "size"),
    [
        (["main/loss"], (1, 1)),
        (["generator/loss", "discriminator/loss", "lr/generator"], (2, 1)),
        (["main/loss", "val/accuracy", "lr/main", "perf/samples_per_s", "perf/steps_per_s"], (4, 1)),
        (["main/loss", "val/psnr", "val/usage", "lr/main", "perf/samples_per_s"], (4, 2)),  # 5 panels
    ],
)
def test_losses_together_each_validation_metric_alone_four_a_row(tmp_path, keys, size):
    path = tmp_path / "plots" / "curves.png"
    plot_curves(_rows(keys), path, title="test")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == pytest.approx(420 * size[0], abs=2)
        assert image.height == pytest.approx(340 * size[1], abs=2)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary file left


def test_a_run_without_curves_still_gets_its_image(tmp_path):
    path = tmp_path / "c.png"
    plot_curves({}, path, title="test")  # a re-run that found its Ray run finished trains no step
    with Image.open(path) as image:
        assert image.width == pytest.approx(420, abs=2)


def test_validation_loss_gets_its_own_panel_not_the_training_losses():
    assert _panels(["d/loss", "g/loss", "val/loss", "lr/g"]) == [
        ("losses", ["d/loss", "g/loss"]),
        ("val/loss", ["val/loss"]),
        ("learning rate", ["lr/g"]),
    ]
