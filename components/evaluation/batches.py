"""Image batches streamed from a prepared split: what every judge statistic reads, one batch at a time.

A split is read shard by shard with pyarrow's `iter_batches` and decoded batch by batch, so the real
features and statistics of a split of any size cost one batch of images in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch

from components.data.images import DataError, pngs_to_array
from components.data.shards import read_meta, split_files
from components.io import release_freed_memory

BATCH = 256  # images decoded per batch: bounds memory, matches the evaluator's default batch


class SplitImages:
    """Re-iterable batches (B, C, H, W) float32 in [-1, 1] of one prepared split, in shard order."""

    def __init__(self, data_dir: str | Path, split: str, *, batch_size: int = BATCH) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        meta = read_meta(data_dir)
        self.files = split_files(data_dir, split)
        self.channels, self.size = meta["channels"], meta["image_size"]
        self.num_images = int(meta["counts"][split])
        self.batch_size = batch_size

    def __len__(self) -> int:
        """Images in the split (meta.json's count)."""
        return self.num_images

    def __iter__(self) -> Iterator[torch.Tensor]:
        for path in self.files:
            shard = pq.ParquetFile(path)
            if "image" not in shard.schema_arrow.names:
                raise DataError(f"{path}: no 'image' column (columns: {shard.schema_arrow.names})")
            for record in shard.iter_batches(batch_size=self.batch_size, columns=["image"]):
                pngs = record.column(0).to_pylist()
                if pngs:
                    yield torch.from_numpy(pngs_to_array(pngs, channels=self.channels, size=self.size))
                release_freed_memory()


class LabelledSplit(SplitImages):
    """The same batches with their labels: (images (B, C, H, W), labels (B,) int64) pairs."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        for path in self.files:
            shard = pq.ParquetFile(path)
            missing = {"image", "label"} - set(shard.schema_arrow.names)
            if missing:
                raise DataError(
                    f"{path}: no {sorted(missing)[0]!r} column (columns: {shard.schema_arrow.names})"
                )
            for record in shard.iter_batches(batch_size=self.batch_size, columns=["image", "label"]):
                pngs = record.column(0).to_pylist()
                if pngs:
                    images = pngs_to_array(pngs, channels=self.channels, size=self.size)
                    labels = record.column(1).to_numpy(zero_copy_only=False).astype("int64")
                    yield torch.from_numpy(images), torch.from_numpy(labels)
                release_freed_memory()


def batches_of(images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int) -> Iterable[torch.Tensor]:
    """A tensor (N, C, H, W) split into batches, or an iterable of batches as it is."""
    return images.split(batch_size) if isinstance(images, torch.Tensor) else images
