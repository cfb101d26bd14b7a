"""The shard format: exact round trip, one empty shard for an empty split, schema checks on read."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data.images import DataError
from components.data.shards import (
    SCHEMA,
    SCHEMA_VERSION,
    RowHasher,
    combine_hashes,
    content_hash,
    read_meta,
    read_split,
    write_meta,
    write_shards,
)


def _rows(n: int) -> list[tuple[str, bytes, int]]:
    return [(f"id-{i}", bytes([i, 0, 255, i]) * (i + 1), i % 3 - (i == 4)) for i in range(n)]


def _prepare(tmp_path, rows, *, shard_rows=3):
    shards = {s: write_shards(r, out_dir=tmp_path, split=s, shard_rows=shard_rows) for s, r in rows.items()}
    write_meta({"schema_version": SCHEMA_VERSION, "shards": shards}, out_dir=tmp_path)
    return shards


def test_round_trip_is_exact(tmp_path):
    rows = {"train": _rows(7), "val": _rows(2), "test": []}
    shards = _prepare(tmp_path, rows)
    assert shards["train"] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert shards["test"] == ["test-00000.parquet"]
    for split, expected in rows.items():
        table = read_split(tmp_path, split)
        assert table.schema.equals(SCHEMA)
        got = list(zip(*(table.column(c).to_pylist() for c in ("id", "image", "label")), strict=True))
        assert got == expected
    assert [pq.read_metadata(tmp_path / f).num_rows for f in shards["train"]] == [3, 3, 1]


def test_content_hash_recomputes_and_sees_changes(tmp_path):
    rows = {"train": _rows(5), "val": _rows(1), "test": _rows(2)}
    _prepare(tmp_path, rows)
    hashes = {}
    for split, r in rows.items():
        h = RowHasher()
        for id_, png, label in r:
            h.update(id_, png, label)
        hashes[split] = h.hexdigest()
    assert content_hash(tmp_path) == combine_hashes(hashes)
    rows["val"] = [("id-0", rows["val"][0][1], 1)]  # one label changed
    _prepare(tmp_path, rows)
    assert content_hash(tmp_path) != combine_hashes(hashes)


def test_missing_or_stale_meta(tmp_path):
    with pytest.raises(DataError, match="meta.json not found"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(DataError, match=f"schema_version=0, this code reads {SCHEMA_VERSION}"):
        read_split(tmp_path, "train")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable meta.json"):
        read_meta(tmp_path)


def test_bad_split_missing_shard_and_foreign_schema(tmp_path):
    shards = _prepare(tmp_path, {"train": _rows(4), "val": _rows(1), "test": _rows(1)})
    with pytest.raises(DataError, match=r"split='dev' is not one of \['train', 'val', 'test'\]"):
        read_split(tmp_path, "dev")
    pq.write_table(
        pa.table({"id": ["a"], "image": [b"x"], "label": pa.array([1], pa.int64())}),
        tmp_path / shards["val"][0],
    )
    with pytest.raises(DataError, match="val-00000.parquet: columns"):
        read_split(tmp_path, "val")
    (tmp_path / shards["train"][1]).unlink()
    with pytest.raises(DataError, match="train-00001.parquet: shard listed in meta.json is missing"):
        read_split(tmp_path, "train")
