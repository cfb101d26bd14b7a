"""The token format: `data/tokens/{split}-NNNNN.parquet` + meta.json, made by batch inference on Ray Data.

Columns: `id` (string), `label` (int32), `tokens` (fixed-size list of int32: the h x w index grid,
row-major) and `latent` (fixed-size list of float32: the continuous pre-quantization latent,
(D, h, w) flattened C-order) that latent diffusion trains on. The tokenizer is loaded once per
Ray Data actor, not once per batch, from bytes the driver sends: no node needs the model's folder.

`published` (components.storage.Published, from pipelines/bucket.py) is the same folder in the
bucket: with it, Ray Data's read tasks read the shards there, so the nodes need no copy either.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components.data.images import DataError, pngs_to_array
from components.data.shards import SPLITS, read_meta, shard_name, split_files
from components.io import model_files, release_freed_memory, weights_sha256

if TYPE_CHECKING:  # Ray only where Ray Data runs: reading the format needs none (benchmarks/gpu_train.py)
    import ray.data

TOKENS_SCHEMA_VERSION = 1
META_FILE = "meta.json"


def token_schema(*, grid: tuple[int, int], latent_dim: int) -> pa.Schema:
    h, w = grid
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("tokens", pa.list_(pa.int32(), h * w), nullable=False),
            pa.field("latent", pa.list_(pa.float32(), latent_dim * h * w), nullable=False),
        ]
    )


class TokenizerActor:
    """Ray Data callable class: PNG batches -> token grids and latents with a tokenizer loaded once."""

    def __init__(self, files: dict[str, bytes], *, channels: int, size: int, device: str = "cpu") -> None:
        from components.tokenizer.export import load_vqgan

        torch.set_num_threads(1)
        self.model = load_vqgan(files, device=device)
        self.channels, self.size, self.device = channels, size, torch.device(device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        release_freed_memory()  # the last batch's tensors: a long split must not grow this actor
        x = torch.from_numpy(pngs_to_array(list(batch["image"]), channels=self.channels, size=self.size))
        z = self.model.encode_latents(x.to(self.device))  # (B, D, h, w)
        indices = self.model.quantizer(z).indices  # (B, h, w)
        n = z.shape[0]
        return {
            "id": np.asarray(batch["id"]),
            "label": np.asarray(batch["label"], dtype=np.int32),
            "tokens": indices.reshape(n, -1).to(torch.int32).cpu().numpy(),  # (B, h*w) row-major
            "latent": z.reshape(n, -1).float().cpu().numpy(),  # (B, D*h*w)
        }


def encode_split(
    data_dir: str | Path,
    split: str,
    *,
    model_dir: str | Path,
    batch_size: int = 256,
    num_actors: int = 1,
    use_gpu: bool = False,
    published=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Encode one split of the prepared shards on Ray Data, yielding numpy batches in shard order.

    A split small enough for the driver is read here and handed to Ray through its object store, so
    a cluster's nodes need neither the folder nor a bucket for it; a larger one is read by Ray
    Data's tasks, from `published` when given.
    """
    import ray.data

    from components.data.raydata import bounded, read_parquet, small

    meta = read_meta(data_dir)
    files = [str(p) for p in split_files(data_dir, split)]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards come out in the order they went in
    columns = ["id", "image", "label"]
    if published is not None:
        names = [f"{published.path}/{name}" for name in meta["shards"][split]]
        ds = read_parquet(names, filesystem=published.filesystem, columns=columns)
    elif small(files):
        ds = ray.data.from_arrow([pq.read_table(f, columns=columns) for f in files])
    else:
        ds = read_parquet(files, columns=columns)
    ds = bounded(ds)  # read-ahead: bounded
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60, and its only route warns as deprecated
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        ds = _encode_actors(
            ds, model_dir, meta=meta, batch_size=batch_size, num_actors=num_actors, use_gpu=use_gpu
        )
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")


def _encode_actors(ds, model_dir, *, meta: dict, batch_size: int, num_actors: int, use_gpu: bool):
    """`ds` mapped through a pool of TokenizerActor, each loading the tokenizer once."""
    import ray.data

    return ds.map_batches(
        TokenizerActor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
        # No actor restarts: Ray Data's default (-1) with the map function's constructor arguments in
        # the object store makes the core worker log an error line per encode (ray issue 53727); a
        # lost tokenizer actor fails the stage instead, and `dvc repro` re-runs it.
        max_restarts=0,
        fn_constructor_args=(model_files(model_dir),),
        fn_constructor_kwargs={
            "channels": meta["channels"],
            "size": meta["image_size"],
            "device": "cuda" if use_gpu else "cpu",
        },
    )


def write_token_split(
    batches: Iterator[dict[str, np.ndarray]],
    *,
    out_dir: Path,
    split: str,
    grid: tuple[int, int],
    latent_dim: int,
    shard_rows: int,
) -> tuple[list[str], int]:
    """Write encoded batches as `{split}-NNNNN.parquet` shards of shard_rows rows, each as it fills
    (memory: one shard plus one batch); (file names, row count)."""
    schema = token_schema(grid=grid, latent_dim=latent_dim)
    names: list[str] = []
    buf: list[pa.Table] = []
    rows = pending = 0

    def flush(n: int) -> None:
        """Write the first n buffered rows as the next shard; the rest stay buffered."""
        nonlocal pending
        table = pa.concat_tables(buf) if buf else schema.empty_table()
        name = shard_name(split, len(names))
        pq.write_table(table.slice(0, n), out_dir / name)
        names.append(name)
        buf[:] = [table.slice(n)] if n < table.num_rows else []
        pending -= n

    for b in batches:
        n = len(b["id"])
        h_w, lat = b["tokens"].shape[1], b["latent"].shape[1]
        if h_w != grid[0] * grid[1] or lat != latent_dim * grid[0] * grid[1]:
            raise DataError(f"encoded batch has {h_w} tokens / {lat} latent values; expected grid {grid}")
        table = pa.table(
            {
                "id": pa.array(b["id"].tolist(), pa.string()),
                "label": pa.array(b["label"], pa.int32()),
                "tokens": pa.FixedSizeListArray.from_arrays(pa.array(b["tokens"].reshape(-1)), h_w),
                "latent": pa.FixedSizeListArray.from_arrays(pa.array(b["latent"].reshape(-1)), lat),
            },
            schema=schema,
        )
        buf.append(table)
        rows += n
        pending += n
        while pending >= shard_rows:  # shards of exactly shard_rows rows, the last one shorter
            flush(shard_rows)
    if pending or not names:
        flush(pending)
    return names, rows


def read_token_meta(tokens_dir: str | Path) -> dict[str, Any]:
    path = Path(tokens_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run the encode stage first")
    meta = json.loads(path.read_text())
    if meta.get("schema_version") != TOKENS_SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {meta.get('schema_version')} != {TOKENS_SCHEMA_VERSION}")
    return meta


def check_tokenizer(meta: dict[str, Any], tokenizer_dir: str | Path) -> None:
    """Tokens (their `meta`) must come from the tokenizer a stage will decode with (else: re-run encode)."""
    path = Path(tokenizer_dir) / "model.safetensors"
    sha = weights_sha256(tokenizer_dir)
    recorded = meta.get("tokenizer", {}).get("model_sha256")
    if recorded != sha:
        raise DataError(
            f"the tokens were encoded by tokenizer {str(recorded)[:12]}, but {path.parent} is {sha[:12]}: "
            "run `dvc repro encode`"
        )


def read_tokens(tokens_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """One split as arrays: tokens (N, h, w) int64, latent (N, D, h, w) float32, label (N,), id (N,)."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}")
    meta = read_token_meta(tokens_dir)
    h, w = meta["grid"]
    d = meta["latent_channels"]
    tables = [pq.read_table(Path(tokens_dir) / name) for name in meta["shards"][split]]
    table = pa.concat_tables(tables)
    n = table.num_rows
    # np.array copies: Arrow's zero-copy views are read-only, and torch warns on each one it wraps
    tokens = np.array(table.column("tokens").combine_chunks().values, dtype=np.int64).reshape(n, h, w)
    latent = np.array(table.column("latent").combine_chunks().values, dtype=np.float32).reshape(n, d, h, w)
    return {
        "id": np.asarray(table.column("id").to_pylist()),
        "label": table.column("label").to_numpy().astype(np.int64),
        "tokens": tokens,
        "latent": latent,
    }


def _token_batch(
    batch: dict[str, np.ndarray], *, grid: tuple[int, int], latent_dim: int
) -> dict[str, np.ndarray]:
    """Flat Parquet lists -> tokens (B, h, w) int64, latent (B, D, h, w) float32, label (B,) int64."""
    h, w = grid

    def rows(column: np.ndarray) -> np.ndarray:  # fixed-size lists may arrive as an object array of rows
        return np.stack(column) if column.dtype == object else column

    n = len(batch["label"])
    return {
        "tokens": rows(batch["tokens"]).astype(np.int64).reshape(n, h, w),
        "latent": rows(batch["latent"]).astype(np.float32).reshape(n, latent_dim, h, w),
        "label": np.asarray(batch["label"], dtype=np.int64),
    }


TRAINING_COLUMNS = ("tokens", "latent", "label")


def token_files(tokens_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split of data/tokens, absolute (Ray's workers change directory)."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}")
    return [(Path(tokens_dir) / name).resolve() for name in read_token_meta(tokens_dir)["shards"][split]]


def token_training_split(
    tokens_dir: str | Path, split: str, *, published=None
) -> dict[str, np.ndarray] | ray.data.Dataset:
    """What a prior or latent-diffusion stage hands to fit(): arrays when small (no Ray Data), else a
    Dataset: materialised when mid-sized, lazy (streamed per worker) when large, as in raydata.py."""
    from components.data.raydata import small, streams

    if small([str(f) for f in token_files(tokens_dir, split)]):
        arrays = read_tokens(tokens_dir, split)
        return {k: arrays[k] for k in TRAINING_COLUMNS} if len(arrays["label"]) else {}
    meta = read_token_meta(tokens_dir)
    h, w = meta["grid"]
    row_bytes = h * w * (8 + 4 * meta["latent_channels"]) + 8  # int64 tokens, float32 latent, int64 label
    materialize = not streams(meta["counts"][split], row_bytes)
    return ray_token_dataset(tokens_dir, split, materialize=materialize, published=published)


def ray_token_dataset(
    tokens_dir: str | Path, split: str, *, materialize: bool = True, published=None
) -> ray.data.Dataset:
    """One split of data/tokens as a Ray Dataset (the columns of `_token_batch`) for a Train worker."""
    from components.data.raydata import bounded, from_columns, read_parquet, small

    files = [str(f) for f in token_files(tokens_dir, split)]
    meta = read_token_meta(tokens_dir)
    if materialize and small(files) and published is None:  # read here: no Ray read tasks (raydata.py)
        arrays = read_tokens(tokens_dir, split)
        return from_columns({k: arrays[k] for k in TRAINING_COLUMNS})
    if published is None:
        ds = read_parquet(files, columns=list(TRAINING_COLUMNS))
    else:  # the same shards, from the bucket
        names = [f"{published.path}/{name}" for name in meta["shards"][split]]
        ds = read_parquet(names, filesystem=published.filesystem, columns=list(TRAINING_COLUMNS))
    ds = ds.map_batches(
        _token_batch,
        batch_format="numpy",
        fn_kwargs={"grid": tuple(meta["grid"]), "latent_dim": meta["latent_channels"]},
    )
    return ds.materialize() if materialize else bounded(ds)
