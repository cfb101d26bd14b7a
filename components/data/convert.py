"""Source records -> prepared rows (standardised PNG + pixel sums), in this process or on Ray Data tasks.

Both paths yield the same `Converted` items in the planned order, so a build's bytes (PNGs, content
hash, meta.json's mean and std) do not depend on which one ran. The Ray path spreads the decode,
resize and PNG encode over the cluster's CPUs in blocks of BLOCK_ROWS; Ray Data's streaming executor
keeps only a bounded window of blocks in flight, and the driver writes each shard as it fills.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from components.data.config import PrepareConfig
from components.data.images import BadImageError, encode_png, standardize
from components.data.sources import Record, Source, open_source

BLOCK_ROWS = 1024  # images per Ray Data block (one task's work): ~0.2-0.5 s of pixel work at 32x32


@dataclass(frozen=True)
class Converted:
    """One record after `standardize`: its PNG and per-channel pixel sums, or the reason it is bad."""

    id: str
    label: int
    png: bytes
    sums: np.ndarray  # (2, C): sum and sum of squares of the [0, 1] pixels, per channel
    pixels: int  # H * W
    bad: BadImageError | None = None


def pixel_sums(pixels: np.ndarray, channels: int) -> tuple[np.ndarray, int]:
    """(H, W[, C]) uint8 -> ((2, C) float64 sums of x and x*x over the [0, 1] pixels, H*W)."""
    x = pixels.reshape(-1, channels).astype(np.float64) / 255.0  # (H*W, C)
    return np.stack([x.sum(0), (x * x).sum(0)]), len(x)


def convert(rec: Record, *, cfg: PrepareConfig) -> Converted:
    """Standardise one record; a bad image comes back as `bad`, not raised (the caller decides)."""
    try:
        img = standardize(rec.open(), cfg=cfg)
    except BadImageError as err:
        return Converted(rec.id, rec.label, b"", np.zeros((2, cfg.channels)), 0, bad=err)
    sums, n = pixel_sums(np.asarray(img), cfg.channels)
    return Converted(rec.id, rec.label, encode_png(img), sums, n)


def local(source: Source, order: np.ndarray, *, cfg: PrepareConfig) -> Iterator[Converted]:
    """The records at `order`, converted one at a time in this process."""
    for i in order:
        yield convert(source.records[i], cfg=cfg)


# --- the Ray Data path ----------------------------------------------------------------------------
_OPENED: dict[str, Source] = {}  # per worker process: the source is listed once, not once per task


def _source(cfg_json: str) -> Source:
    if cfg_json not in _OPENED:
        _OPENED.clear()
        _OPENED[cfg_json] = open_source(PrepareConfig.model_validate_json(cfg_json))
    return _OPENED[cfg_json]


def convert_block(batch: pa.Table, *, cfg_json: str) -> pa.Table:
    """Ray Data map: a block of source indices -> id, label, png, sums (2C+1: sums and H*W), origin, reason."""
    cfg = PrepareConfig.model_validate_json(cfg_json)
    source = _source(cfg_json)
    items = [convert(source.records[i], cfg=cfg) for i in batch.column("data").to_numpy()]
    width = 2 * cfg.channels + 1
    sums = np.zeros((len(items), width))
    for row, item in enumerate(items):
        sums[row, :-1], sums[row, -1] = item.sums.reshape(-1), item.pixels
    return pa.table(
        {
            "id": pa.array([c.id for c in items], pa.string()),
            "label": pa.array([c.label for c in items], pa.int32()),
            "png": pa.array([c.png for c in items], pa.binary()),
            "sums": pa.FixedSizeListArray.from_arrays(pa.array(sums.reshape(-1)), width),
            "origin": pa.array([c.bad.path if c.bad else "" for c in items], pa.string()),
            "reason": pa.array([c.bad.reason if c.bad else "" for c in items], pa.string()),
        }
    )


def on_ray(order: np.ndarray, *, cfg: PrepareConfig, block_rows: int = BLOCK_ROWS) -> Iterator[Converted]:
    """The records at `order`, converted by Ray Data tasks (Ray must be initialised), in order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    kept = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # rows come back in the planned order
    try:
        blocks: Sequence[np.ndarray] = [order[i : i + block_rows] for i in range(0, len(order), block_rows)]
        ds = ray.data.from_numpy(list(blocks) or [order]).map_batches(
            convert_block,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"cfg_json": cfg.model_dump_json()},
        )
        channels = cfg.channels
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            sums = batch.column("sums").combine_chunks().values.to_numpy().reshape(len(batch), -1)
            columns = zip(
                *(batch.column(c).to_pylist() for c in ("id", "label", "png", "origin", "reason")),
                strict=True,
            )
            for (id_, label, png, origin, reason), row in zip(columns, sums, strict=True):
                bad = BadImageError(origin, reason) if reason else None
                yield Converted(id_, label, png, row[:-1].reshape(2, channels), int(row[-1]), bad=bad)
    finally:
        ctx.execution_options.preserve_order = kept
