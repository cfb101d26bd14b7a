"""The torch Dataset over one split: decoded once, float32 in [-1, 1], int64 labels, shard order."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from components.data.build import build_dataset
from components.data.images import png_to_array
from components.data.readers import ShardDataset
from components.data.shards import read_split


def test_items_match_the_shards(tmp_path, tiny_shapes):
    torch.set_num_threads(1)
    build_dataset(tiny_shapes, tmp_path / "out", log=lambda _: None)
    ds = ShardDataset(tmp_path / "out", "test")
    table = read_split(tmp_path / "out", "test")
    assert len(ds) == table.num_rows == 8
    assert ds.class_names == tiny_shapes.shapes.classes
    for i in (0, 7):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 8, 8)
        assert item["label"].dtype == torch.int64
        assert int(item["label"]) == table.column("label")[i].as_py()
        expected = png_to_array(table.column("image")[i].as_py(), channels=3)
        np.testing.assert_array_equal(item["image"].numpy(), expected)
    assert ds.ids == table.column("id").to_pylist()
    assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0


def test_collates_into_the_batch_contract(tmp_path, tiny_shapes):
    build_dataset(tiny_shapes, tmp_path / "out", log=lambda _: None)
    batch = next(iter(DataLoader(ShardDataset(tmp_path / "out", "train"), batch_size=5)))
    assert batch["image"].shape == (5, 3, 8, 8) and batch["label"].shape == (5,)
    assert batch["label"].dtype == torch.int64


def test_readers_do_not_import_ray():
    import ast
    from pathlib import Path

    import components.data.readers as readers

    tree = ast.parse(Path(readers.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(n == "ray" or n.startswith("ray.") for n in names)
