"""A torch Dataset over one split of the prepared shards, decoded once into memory.

The prepared sets are small (the default is 1797 images of 16x16), so decoding every PNG up front
and indexing a float tensor is both the simplest and the fastest reader for unit tests and eval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from components.data.images import pngs_to_array
from components.data.shards import read_meta, read_split


class ShardDataset(Dataset):
    """Items {"image": (C, H, W) float32 in [-1, 1], "label": int64 scalar} in shard order."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.meta = read_meta(data_dir)
        table = read_split(data_dir, split)
        self.ids: list[str] = table.column("id").to_pylist()
        self.class_names: tuple[str, ...] = tuple(self.meta["class_names"])
        x = pngs_to_array(
            table.column("image").to_pylist(), channels=self.meta["channels"], size=self.meta["image_size"]
        )
        self.images = torch.from_numpy(x)  # (N, C, H, W)
        self.labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))  # (N,)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


def epoch_batches(
    columns: dict[str, torch.Tensor],
    *,
    batch: int,
    seed: int,
    rank: int = 0,
    device: torch.device | None = None,
) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """batches(epoch) over in-memory columns: a reshuffle seeded by (seed, epoch, rank), equal batches.

    The order depends only on its arguments, never on the global RNG, so a resume replays an epoch.
    """
    n = len(next(iter(columns.values())))

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch + rank))
        for start in range(0, n - batch + 1, batch):  # drop_last: equal batches (DDP's mean stays exact)
            idx = order[start : start + batch]
            yield {k: v[idx].to(device or v.device, non_blocking=True) for k, v in columns.items()}

    return batches
