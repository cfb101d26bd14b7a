"""The Ray Data view of one split: Parquet shards -> decoded float32 images for Ray Train workers.

Three sizes, three paths (`training_split`):
- under IN_DRIVER_BYTES of Parquet: read and decoded in the calling process and handed over as
  arrays: no read tasks, so no worker processes to start (their start-up cost ~5 s per stage on
  2 cores, more than reading 1,259 digits takes);
- under STREAM_BYTES decoded: a materialised Dataset (re-reading Parquet on each epoch was measured
  about 10x slower than reading the decoded rows from the object store);
- above: a lazy Dataset. Ray Data reads the Parquet and decodes per batch as each Train worker
  iterates its streaming shard, so the split is never whole in the driver or the object store.
Each threshold has an environment override (GENPIPE_IN_DRIVER_BYTES, GENPIPE_STREAM_BYTES), so a test
or a benchmark can force the streaming path on small data. A lazy split reads ahead at most
READ_AHEAD_BYTES, in blocks of at most BLOCK_BYTES (`bounded`; GENPIPE_READ_AHEAD_BYTES,
GENPIPE_BLOCK_BYTES).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from components.data.images import pngs_to_array
from components.data.shards import read_meta, split_files
from components.training import ray_trims

DECODE_BATCH = 256  # rows decoded per task call: bounds float memory when images are large
IN_DRIVER_BYTES = 64 * 1024**2  # Parquet bytes of a split read in the driver instead of by Ray tasks
STREAM_BYTES = 1024**3  # decoded bytes of a split from which it streams instead of being materialised
# A lazy split's read-ahead in the object store. Without a limit Ray Data decodes as far ahead as
# its share of the object store allows (GBs) when the consumer is slower than the reads: measured
# on 200k 32x32 shapes, a training worker's peak RSS was 2.2x that at 20k.
READ_AHEAD_BYTES = 256 * 1024**2
# A lazy split's largest block (Ray Data's default: 128 MiB). A read task builds each output block in
# its own memory before the object store takes it, and it packs the rows of several shards into one
# block until the limit: at 20k 32x32 shapes a task's block held one shard (49 MiB), at 100k up to
# 128 MiB, so the read workers' private memory grew with N.
BLOCK_BYTES = 16 * 1024**2
# Parquet files a footer reader lists (Ray 2.60 starts 32 per read, a process each; an actor reads
# its files' footers 10 at a time with up to 128 requests in flight).
FOOTERS_PER_ACTOR = 64


def threshold(name: str, default: int | None = None) -> int:
    """A size threshold (`default`, else this module's constant `name`), or its GENPIPE_<name> override."""
    env = f"GENPIPE_{name}"
    raw = os.environ.get(env)
    if raw is None:
        return int(globals()[name] if default is None else default)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a byte count") from None


def from_columns(columns: dict[str, np.ndarray]) -> ray.data.Dataset:
    """Equal-length arrays (one row per leading index) as a materialised Dataset, without a task."""
    from ray.data.extensions import ArrowTensorArray

    table = pa.table(
        {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in columns.items()}
    )
    return ray.data.from_arrow(table)


def small(files: list[str]) -> bool:
    """True when the files together are small enough to read in the driver (IN_DRIVER_BYTES)."""
    return sum(Path(f).stat().st_size for f in files) < threshold("IN_DRIVER_BYTES")


def bounded(ds: ray.data.Dataset) -> ray.data.Dataset:
    """`ds` reading ahead at most READ_AHEAD_BYTES (GENPIPE_READ_AHEAD_BYTES) in the object store,
    in blocks of at most BLOCK_BYTES (GENPIPE_BLOCK_BYTES)."""
    ds.context.target_max_block_size = threshold("BLOCK_BYTES")
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=threshold("READ_AHEAD_BYTES"))
    return ds


def read_parquet(paths: list[str], *, task_bytes: int | None = None, **kwargs) -> ray.data.Dataset:
    """ray.data.read_parquet whose read tasks each take at most `task_bytes` (default BLOCK_BYTES)
    of Parquet, at least one file each, and whose listing starts one footer reader per
    FOOTERS_PER_ACTOR files.

    Ray 2.60 packs the files into read tasks of up to 128 MiB of Parquet rows each
    (RAY_DATA_PARQUET_BIN_PACKING_BYTES, private, read when the Dataset is made), all in the task's
    memory at once: the read workers' private memory grew with N until a split held 128 MiB (32x32
    shapes: 174 MiB at 20k, 305 MiB at 200k). It also lists the files by reading their footers on
    32 actors per read (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), a worker process each: on a two-node
    cluster of 1-CPU nodes a three-file split waited ~45 s for them. Both knobs are Ray-internal, so
    they are the version-gated trims `parquet_read_tasks` and `parquet_footer_actors`
    (components/training/ray_trims.py). A value the user set wins.
    """
    bytes_ = task_bytes or threshold("BLOCK_BYTES")
    with ray_trims.parquet_reads(len(paths), task_bytes=bytes_, footers_per_actor=FOOTERS_PER_ACTOR):
        return ray.data.read_parquet(paths, **kwargs)


def image_task_bytes(files: list[str], rows: int, row_bytes: int) -> int:
    """Parquet bytes per read task so that a task's images, decoded, are about BLOCK_BYTES.

    PNGs compress 10-40x (32x32 shapes: ~360 bytes a PNG, 12 KiB decoded), so a task of BLOCK_BYTES
    of Parquet would hand one decode task ~500 MiB of images: a read-ahead far past
    READ_AHEAD_BYTES, decoded in one burst on the CPUs training needs. At least one file a task."""
    stored = sum(Path(f).stat().st_size for f in files)
    return max(1, threshold("BLOCK_BYTES") * stored // max(1, rows * row_bytes))


def decoded_row_bytes(meta: dict) -> int:
    """Bytes of one decoded row of a prepared split: a float32 image and an int64 label."""
    return 4 * meta["channels"] * meta["image_size"] ** 2 + 8


def streams(rows: int, row_bytes: int) -> bool:
    """True when `rows` decoded rows of `row_bytes` reach STREAM_BYTES: stream, never materialise."""
    return rows * row_bytes >= threshold("STREAM_BYTES")


def decode_batch(batch: dict[str, np.ndarray], *, channels: int, size: int) -> dict[str, np.ndarray]:
    """{"image": PNG bytes (B,), "label": int32 (B,)} -> image float32 (B, C, H, W) in [-1, 1], label int64."""
    return {
        "image": pngs_to_array(list(batch["image"]), channels=channels, size=size),
        "label": np.asarray(batch["label"], dtype=np.int64),
    }


def read_columns(data_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """The whole split decoded in this process: "image" (N, C, H, W) float32, "label" (N,) int64."""
    meta = read_meta(data_dir)
    files = [str(p) for p in split_files(data_dir, split)]
    table = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in files])
    if table.num_rows == 0:
        return {}
    batch = {"image": table.column("image").to_numpy(), "label": table.column("label").to_numpy()}
    return decode_batch(batch, channels=meta["channels"], size=meta["image_size"])


def training_split(
    data_dir: str | Path, split: str, *, published=None
) -> dict[str, np.ndarray] | ray.data.Dataset:
    """What a training stage hands to fit(): numpy columns when small, a materialised Dataset when
    mid-sized, a lazy (streamed) Dataset when large (see the module docstring).

    Columns skip Ray Data altogether: building even a materialised Dataset from arrays runs a task
    (~2 s per split for its worker process on 2 cores), and fit() would only turn it back into arrays.
    `published` (components.storage.Published: the same folder in a bucket) makes Ray Data's read
    tasks read the shards from the bucket, so the nodes need no copy of `data_dir`.
    """
    if small([str(p) for p in split_files(data_dir, split)]):
        return read_columns(data_dir, split)
    meta = read_meta(data_dir)
    materialize = not streams(meta["counts"][split], decoded_row_bytes(meta))
    return ray_dataset(data_dir, split, materialize=materialize, published=published)


def ray_dataset(
    data_dir: str | Path, split: str, *, materialize: bool = True, published=None
) -> ray.data.Dataset:
    """The split as a Ray Dataset with columns "image" (C, H, W) float32 and "label" int64."""
    meta = read_meta(data_dir)
    files = [str(p) for p in split_files(data_dir, split)]  # absolute: workers change directory
    if materialize and small(files) and published is None:
        columns = read_columns(data_dir, split)
        return from_columns(columns) if columns else ray.data.from_items([]).materialize()
    task_bytes = image_task_bytes(files, meta["counts"][split], decoded_row_bytes(meta))
    if published is None:
        ds = read_parquet(files, task_bytes=task_bytes, columns=["image", "label"])
    else:  # the same shards, from the bucket: meta.json's names under the published folder
        names = [f"{published.path}/{name}" for name in meta["shards"][split]]
        ds = read_parquet(
            names, task_bytes=task_bytes, filesystem=published.filesystem, columns=["image", "label"]
        )
    ds = ds.map_batches(
        decode_batch,
        batch_format="numpy",
        batch_size=DECODE_BATCH,
        fn_kwargs={"channels": meta["channels"], "size": meta["image_size"]},
    )
    return ds.materialize() if materialize else bounded(ds)
