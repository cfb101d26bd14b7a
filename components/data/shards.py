"""The prepared-data format: Parquet shards `{split}-NNNNN.parquet` (id, image PNG, label) + meta.json.

Readers check meta.json's schema_version and each shard's columns before use, so a stale or foreign
directory fails with a message naming the file instead of deep inside a training worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.data.images import DataError

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG bytes, L or RGB, image_size square
        pa.field("label", pa.int32(), nullable=False),  # -1 when unlabelled
    ]
)

Row = tuple[str, bytes, int]  # (id, PNG bytes, label)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}")


class RowHasher:
    """sha256 over rows in order: each id, label and PNG, length-prefixed so fields cannot run together."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, id_: str, png: bytes, label: int) -> None:
        key = id_.encode()
        self._h.update(len(key).to_bytes(4, "little") + key)
        self._h.update(int(label).to_bytes(4, "little", signed=True))
        self._h.update(len(png).to_bytes(8, "little") + png)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def combine_hashes(per_split: dict[str, str]) -> str:
    """The dataset's content hash: sha256 over the per-split row hashes in SPLITS order."""
    blob = "".join(f"{s}:{per_split[s]}\n" for s in SPLITS)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _write(rows: list[Row], path: Path) -> None:
    ids, pngs, labels = zip(*rows, strict=True) if rows else ((), (), ())
    table = pa.table(
        [pa.array(ids, pa.string()), pa.array(pngs, pa.binary()), pa.array(labels, pa.int32())],
        schema=SCHEMA,
    )
    pq.write_table(table, path, use_dictionary=["label"])  # ids and PNGs are unique: no dictionary


def write_shards(rows: Iterable[Row], *, out_dir: Path, split: str, shard_rows: int) -> list[str]:
    """Stream rows into `{split}-NNNNN.parquet` files of shard_rows rows; one empty shard if no rows."""
    _check_split(split)
    if shard_rows < 1:
        raise ValueError(f"shard_rows={shard_rows} must be >= 1")
    names: list[str] = []
    buf: list[Row] = []
    for row in rows:
        buf.append(row)
        if len(buf) == shard_rows:
            names.append(shard_name(split, len(names)))
            _write(buf, Path(out_dir) / names[-1])
            buf = []
    if buf or not names:  # an empty split still gets a file, so every reader finds a schema
        names.append(shard_name(split, len(names)))
        _write(buf, Path(out_dir) / names[-1])
    return names


def write_meta(meta: dict[str, Any], *, out_dir: Path) -> None:
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")


def image_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of a prepared data set's images, from its meta.json."""
    return meta["channels"], meta["image_size"], meta["image_size"]


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory, with its schema version checked."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: not a prepared data directory (run the prepare stage)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable meta.json ({err})") from None
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version={version!r}, this code reads {SCHEMA_VERSION} (re-run prepare)"
        )
    return meta


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """Absolute paths of the split's shards as listed in meta.json; each must exist."""
    _check_split(split)
    meta = read_meta(data_dir)
    root = Path(data_dir).resolve()
    files = [root / name for name in meta["shards"][split]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: shard listed in meta.json is missing")
    return files


def read_split(data_dir: str | Path, split: str) -> pa.Table:
    """All rows of one split, in shard order, as a Table with columns id, image, label."""
    tables = []
    for path in split_files(data_dir, split):
        table = pq.read_table(path)
        if not table.schema.equals(SCHEMA, check_metadata=False):
            raise DataError(f"{path}: columns {table.schema} differ from the expected {SCHEMA}")
        tables.append(table)
    return pa.concat_tables(tables)


def content_hash(data_dir: str | Path) -> str:
    """Recompute the content hash from the shards (equals meta.json's `content_hash` when intact)."""
    per_split = {}
    for split in SPLITS:
        h = RowHasher()
        table = read_split(data_dir, split)
        for id_, png, label in zip(
            *(table.column(c).to_pylist() for c in ("id", "image", "label")), strict=True
        ):
            h.update(id_, png, label)
        per_split[split] = h.hexdigest()
    return combine_hashes(per_split)
