"""Image grids for sample and reconstruction previews, in torch and PIL (no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.io import atomic_file

MIN_TILE = 64  # automatic upscaling makes each tile at least this many pixels on its longer side


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in 0..255 (values outside are clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(
    images: torch.Tensor, *, nrow: int = 8, padding: int = 2, scale: int | None = None, pad_value: int = 128
) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into a uint8 (H', W', C) array, `nrow` tiles per row.

    Each tile is upscaled by the integer `scale` (nearest); None picks the smallest factor that makes
    tiles at least 64 pixels, so 16x16 digits become 64x64. `padding` pixels of `pad_value` separate
    tiles and frame the grid.
    """
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"make_grid needs (N, C, H, W) with N >= 1 and C in (1, 3), got {tuple(images.shape)}"
        )
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"nrow={nrow} must be >= 1, padding={padding} >= 0, pad_value={pad_value} in 0..255")
    n, c, h, w = images.shape
    if scale is None:
        scale = max(1, -(-MIN_TILE // max(h, w)))  # ceil division
    if scale < 1:
        raise ValueError(f"scale={scale} must be a positive integer")
    tiles = to_uint8(images).cpu()
    tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest upscaling
    th, tw = h * scale, w * scale
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = torch.full(
        (c, padding + rows * (th + padding), padding + cols * (tw + padding)), pad_value, dtype=torch.uint8
    )
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (th + padding), padding + q * (tw + padding)
        grid[:, top : top + th, left : left + tw] = tiles[i]
    return grid.permute(1, 2, 0).numpy()  # (C, H', W') -> (H', W', C)


def save_png(grid: np.ndarray, path: str | Path) -> None:
    """Write a uint8 (H, W, C) grid as PNG, atomically (temp file + rename)."""
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] not in (1, 3):
        raise ValueError(f"save_png needs a uint8 (H, W, 1|3) array, got {grid.dtype} {grid.shape}")
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
