"""How a Train worker gets its rows: arrays from the driver, a cached shard, or a streamed shard.

`data_mode` picks one per fit (the training adapter reports which ran):
- "in_memory": every split is small; the driver puts its arrays in the object store once and each
  rank takes a contiguous share (no Ray Data, no split coordinator);
- "cached": the train split is a materialised Dataset whose per-worker share is under CACHE_BYTES;
  each worker pulls its streaming shard once and reshuffles it from memory every epoch;
- "streamed": the train split is lazy (or too large to cache); every epoch each worker iterates its
  streaming shard, Ray Data reading and decoding Parquet per batch, shuffled in a local buffer.
A streamed split reads ahead at most raydata.READ_AHEAD_BYTES in the object store (`ingest_options`).
Thresholds have environment overrides (GENPIPE_IN_MEMORY_BYTES, GENPIPE_CACHE_BYTES,
GENPIPE_READ_AHEAD_BYTES), like raydata's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import ray.data
import torch

from components.data.raydata import from_columns, threshold
from components.data.readers import epoch_batches

Columns = dict[str, np.ndarray]  # a small split's rows: equal-length arrays, one row per leading index
Batch = dict[str, torch.Tensor]
MODES = ("in_memory", "cached", "streamed")
CACHE_BYTES = 2 * 1024**3  # per worker: shards under this are held in memory after one pass
IN_MEMORY_BYTES = 256 * 1024**2  # a materialized split under this goes to the workers as arrays
CACHE_ROWS = 4096  # rows per pull while filling a worker's cache


def _materialized(ds: object) -> bool:
    return isinstance(ds, ray.data.dataset.MaterializedDataset)


def small(ds: ray.data.Dataset | Columns) -> bool:
    """Numpy columns, or a materialised Dataset under IN_MEMORY_BYTES: handed over as arrays."""
    if isinstance(ds, dict):
        return True
    return _materialized(ds) and ds.size_bytes() < threshold("IN_MEMORY_BYTES", IN_MEMORY_BYTES)


def fits_in_memory(ds: ray.data.Dataset, *, workers: int) -> bool:
    """True for a materialised dataset whose per-worker shard is small enough to cache."""
    return _materialized(ds) and ds.size_bytes() / workers < threshold("CACHE_BYTES", CACHE_BYTES)


def data_mode(datasets: dict[str, ray.data.Dataset | Columns], *, workers: int) -> str:
    """One of MODES for these splits on `workers` workers (see the module docstring)."""
    if all(small(ds) for ds in datasets.values()):
        return "in_memory"
    train = datasets["train"]  # numpy columns become a materialised Dataset beside a streamed val split
    return "cached" if isinstance(train, dict) or fits_in_memory(train, workers=workers) else "streamed"


def ingest_options(mode: str) -> ray.data.ExecutionOptions | None:
    """Ray Data options for the workers' shards: a streamed split reads ahead at most raydata's
    READ_AHEAD_BYTES (GENPIPE_READ_AHEAD_BYTES overrides); None (Train's defaults) for the other modes."""
    if mode != "streamed":
        return None
    current = ray.data.DataContext.get_current().execution_options
    limit = current.resource_limits.copy(object_store_memory=threshold("READ_AHEAD_BYTES"))
    return ray.data.ExecutionOptions(
        resource_limits=limit,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


def lazy_splits(datasets: dict[str, ray.data.Dataset | Columns]) -> list[str]:
    """The splits that Ray Data still has to read (lazy Datasets): they need CPUs for read tasks."""
    return [k for k, ds in datasets.items() if not isinstance(ds, dict) and not _materialized(ds)]


def as_dataset(columns: Columns) -> ray.data.Dataset:
    """Numpy columns as a materialized Dataset (a small split beside a streamed one)."""
    return from_columns(columns) if columns else ray.data.from_items([]).materialize()


def as_columns(ds: ray.data.Dataset | Columns) -> Columns:
    """Every row of a small split as numpy columns (an empty one included)."""
    if isinstance(ds, dict):
        return ds
    if ds.count() == 0:
        return {}
    return ds.take_batch(batch_size=ds.count(), batch_format="numpy")


def rank_share(columns: Columns, *, rank: int, world: int, equal: bool) -> dict[str, torch.Tensor]:
    """This rank's rows: a contiguous 1/world of them (equal counts on every rank when `equal`)."""
    n = len(next(iter(columns.values()), ()))
    per = n // world if equal else -(-n // world)
    return {k: torch.as_tensor(np.array(v[rank * per : (rank + 1) * per])) for k, v in columns.items()}


def in_memory_val(
    val: dict[str, torch.Tensor], *, micro: int, device: torch.device
) -> Callable[[], Iterator[Batch]]:
    """val_batches() over this rank's in-memory validation rows, in order, the last batch partial."""
    n = len(next(iter(val.values())))

    def batches() -> Iterator[Batch]:
        for i in range(0, n, micro):
            yield {k: v[i : i + micro].to(device) for k, v in val.items()}

    return batches


class CachedShard:
    """This worker's train shard pulled once from Ray Data, then reshuffled from memory each epoch.

    Each `iter_torch_batches` call starts a new streaming execution of the split (0.05-0.4 s); with
    an epoch of ~1 s on the default data that was a 10-20% slowdown. The rows a rank got in its first
    pass (an equal share: streaming_split(equal=True)) stay its partition, as with a fixed sampler;
    the per-epoch order comes from a generator seeded by (seed, epoch, rank), so a resume replays it.
    """

    def __init__(self, shard, *, micro: int, seed: int, rank: int, device: torch.device) -> None:
        self.shard, self.micro, self.seed, self.rank, self.device = shard, micro, seed, rank, device
        self.batches: Callable[[int], Iterable[Batch]] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self.shard.iter_torch_batches(batch_size=CACHE_ROWS, drop_last=False):
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    def __call__(self, epoch: int) -> Iterable[Batch]:
        if self.batches is None:
            self.batches = epoch_batches(
                self._load(), batch=self.micro, seed=self.seed, rank=self.rank, device=self.device
            )
        return self.batches(epoch)


class StreamedShard:
    """This worker's train shard streamed anew each epoch: Ray Data reads and decodes per batch.

    Equal micro-batches (drop_last) keep DDP's mean exact; the local shuffle buffer's seed comes
    from (seed, epoch, rank), so the order changes every epoch and a resume replays it. Nothing
    beyond the buffer and Ray Data's prefetch window is held: the worker's memory does not grow
    with the split.
    """

    def __init__(self, shard, *, micro: int, seed: int, rank: int, device: torch.device, buffer: int | None):
        self.shard, self.micro, self.seed, self.rank, self.device = shard, micro, seed, rank, device
        self.buffer = buffer

    def __call__(self, epoch: int) -> Iterable[Batch]:
        return self.shard.iter_torch_batches(
            batch_size=self.micro,
            drop_last=True,
            local_shuffle_buffer_size=self.buffer,
            local_shuffle_seed=None if self.buffer is None else self.seed + 7919 * epoch + self.rank,
            device=self.device,
        )
