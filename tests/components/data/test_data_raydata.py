"""The Ray Data reader on a real local Ray returns what the torch Dataset returns."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray.data.dataset import MaterializedDataset

from components.data.build import build_dataset
from components.data.raydata import ray_dataset
from components.data.readers import ShardDataset


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from components.data.config import PrepareConfig

    cfg = PrepareConfig(
        source="builtin:shapes",
        channels=3,
        image_size=8,
        split={"val": 0.0, "test": 0.2},
        shard_rows=7,
        shapes={"count": 40, "size": 16},
    )
    out = tmp_path_factory.mktemp("ray") / "processed"
    build_dataset(cfg, out, log=lambda _: None)
    return out


def _sorted(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray may reorder blocks: compare as multisets, ordered by the image bytes then label."""
    keys = [
        im.tobytes() + int(y).to_bytes(8, "little", signed=True) for im, y in zip(images, labels, strict=True)
    ]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return images[order], labels[order]


@pytest.mark.parametrize("materialize", [True, False])
def test_ray_matches_torch_dataset(local_ray, prepared, materialize):
    ds = ray_dataset(prepared, "train", materialize=materialize)
    assert isinstance(ds, MaterializedDataset) == materialize
    batch = ds.take_batch(batch_size=1000, batch_format="numpy")
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (32, 3, 8, 8)
    assert batch["label"].dtype == np.int64
    ref = ShardDataset(prepared, "train")
    got = _sorted(batch["image"], batch["label"])
    want = _sorted(ref.images.numpy(), ref.labels.numpy())
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_torch_batches_and_empty_split(local_ray, prepared):
    ds = ray_dataset(prepared, "test")
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 3, 8, 8) and str(batch["label"].dtype) == "torch.int64"
    assert ray_dataset(prepared, "val").count() == 0  # val=0: one empty shard, an empty dataset


def test_training_split_is_arrays_when_small_a_dataset_when_not_and_lazy_when_large(
    local_ray, prepared, monkeypatch
):
    from components.data import raydata

    columns = raydata.training_split(prepared, "train")
    assert isinstance(columns, dict)  # read and decoded here: no Ray Data at all
    ref = ShardDataset(prepared, "train")
    np.testing.assert_array_equal(columns["image"], ref.images.numpy())
    np.testing.assert_array_equal(columns["label"], ref.labels.numpy())
    assert raydata.training_split(prepared, "val") == {}  # an empty split: no columns
    monkeypatch.setattr(raydata, "IN_DRIVER_BYTES", 1)  # a set too large to read in the driver
    ds = raydata.training_split(prepared, "train")
    assert isinstance(ds, MaterializedDataset) and ds.count() == len(ref)  # mid-sized: materialised
    monkeypatch.setenv("GENPIPE_STREAM_BYTES", str(len(ref) * (3 * 8 * 8 * 4 + 8)))  # exactly its size
    lazy = raydata.training_split(prepared, "train")
    assert not isinstance(lazy, MaterializedDataset) and lazy.count() == len(ref)  # large: streamed
    assert lazy.context.execution_options.resource_limits.object_store_memory == raydata.READ_AHEAD_BYTES
    monkeypatch.setenv("GENPIPE_STREAM_BYTES", "lots")
    with pytest.raises(ValueError, match="GENPIPE_STREAM_BYTES='lots' is not a byte count"):
        raydata.training_split(prepared, "train")
