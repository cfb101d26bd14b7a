"""Image grids: shape, tile placement, upscaling and the PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from components.evaluation.grid import make_grid, save_png, to_uint8


def _distinct(n: int, c: int = 1, size: int = 4) -> torch.Tensor:
    """Image i is constant at a value that maps to uint8 level 10 * (i + 1)."""
    levels = torch.arange(1, n + 1).float() * 10
    return (levels / 127.5 - 1).view(n, 1, 1, 1).expand(n, c, size, size).clone()


def test_to_uint8_endpoints_and_clipping() -> None:
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0, -7.0])).tolist() == [0, 128, 255, 255, 0]


def test_grid_shape_and_tile_placement() -> None:
    grid = make_grid(_distinct(5), nrow=3, padding=1, scale=2, pad_value=7)
    tile = 4 * 2
    assert grid.shape == (1 + 2 * (tile + 1), 1 + 3 * (tile + 1), 1) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 1 + r * (tile + 1), 1 + c * (tile + 1)
        assert (grid[top : top + tile, left : left + tile] == 10 * (i + 1)).all()
    assert (grid[0] == 7).all() and (grid[:, 0] == 7).all()  # frame
    assert (grid[1 + tile + 1 :, 1 + 2 * (tile + 1) :] == 7).all()  # empty sixth slot


def test_nearest_upscaling_keeps_pixels_blocky() -> None:
    x = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).view(1, 1, 2, 2).expand(1, 1, 2, 2)
    x = x.repeat(1, 1, 4, 4)  # 8x8 checkerboard
    grid = make_grid(x, padding=0, scale=3)
    assert grid.shape == (24, 24, 1)
    assert (grid[:3, :3] == 0).all() and (grid[:3, 3:6] == 255).all()


def test_automatic_scale_makes_digits_viewable() -> None:
    assert make_grid(_distinct(2, size=16), padding=0).shape == (64, 128, 1)
    assert make_grid(_distinct(1, size=100), padding=0).shape == (100, 100, 1)


def test_save_png_round_trip(tmp_path) -> None:
    rgb = make_grid(_distinct(4, c=3), nrow=2, padding=2)
    path = tmp_path / "plots" / "grid.png"
    save_png(rgb, path)
    assert np.array_equal(np.asarray(Image.open(path)), rgb)
    grey = make_grid(_distinct(3), nrow=3)
    save_png(grey, path)  # overwrite in place
    assert np.array_equal(np.asarray(Image.open(path)), grey[:, :, 0])
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="C in"):
        make_grid(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((4, 4, 1), dtype=np.float32), "x.png")
