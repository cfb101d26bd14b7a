"""Ray on the bucket: Train checkpoints in S3 (moto, tests/s3.py) and Ray Data reading a published split.

A tiny real fit() (the training tests' toy regression) with `train.storage_path=s3://...`: its
checkpoints are objects in the bucket, and a second fit with the same run name resumes from them.
Ray's workers get the credentials from the environment Ray was started in, as on a real node.
"""

from __future__ import annotations

import importlib
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from components.storage import Bucket, publish
from components.training.config import LoopConfig, TrainConfig
from components.training.ray_adapter import fit
from tests import s3 as s3_fixtures

toy = importlib.import_module("tests.components.training.conftest")  # the toy tasks (not a fixture here)
s3 = s3_fixtures.s3  # the session's S3 server
N = 8
LOOP = dict(batch_size=N, lr=0.1, schedule="cosine", warmup_steps=1, grad_clip=None, log_every=1)


@pytest.fixture(scope="module")
def ray_on_bucket(s3):
    """A local Ray started with the bucket's credentials and endpoint in its environment."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**s3.env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}.items():
            env.setenv(key, value)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.cloudpickle.register_pickle_by_value(toy)
        yield s3
        ray.shutdown()


def _fit(tmp_path, storage: str, *, sink: str):
    data = toy.make_data(N)
    return fit(
        task_factory=toy.RegressionTask,
        loop=LoopConfig(steps=4, checkpoint_every=2, **LOOP),
        train=TrainConfig(num_workers=1, storage_path=storage, max_failures=0, num_to_keep=2),
        run_name="bucket-run",
        datasets={"train": {"image": data["image"].numpy(), "label": data["label"].numpy().astype(np.int64)}},
        sink_factory=partial(toy.JsonlSink, sink),
        owned_instance=True,
    )


def test_checkpoints_land_in_the_bucket_and_a_second_fit_resumes_from_them(ray_on_bucket, tmp_path):
    server = ray_on_bucket
    storage = f"s3://{server.bucket}/ray"
    sink = str(tmp_path / "steps.jsonl")
    first = _fit(tmp_path, storage, sink=sink)
    assert first.resumed_from is None and first.path == f"{server.bucket}/ray/bucket-run"
    keys = server.keys("ray/bucket-run/")
    checkpoints = [k for k in keys if k.endswith("/state.pt")]
    assert len(checkpoints) == 2, keys  # steps 2 and 4, num_to_keep=2
    assert all(k.startswith("ray/bucket-run/checkpoint_") for k in checkpoints)
    assert not list(tmp_path.glob("**/checkpoint_*"))  # nothing on local disk

    second = _fit(tmp_path, storage, sink=sink)  # same name: the finished run's checkpoint, from S3
    assert second.resumed_from == 4 and second.state()["step"] == 4
    assert [r["step"] for r in toy.read_jsonl(sink)] == [1, 2, 3, 4]  # nothing retrained
    w = first.module_states(ema_module=None)["net"]["weight"]
    torch.testing.assert_close(second.module_states(ema_module=None)["net"]["weight"], w, atol=0, rtol=0)


def test_ray_data_reads_a_published_split_from_the_bucket(ray_on_bucket, tmp_path):
    server = ray_on_bucket
    folder = tmp_path / "processed"
    folder.mkdir()
    table = pa.table({"id": [f"r{k}" for k in range(10)], "label": pa.array(range(10), pa.int32())})
    pq.write_table(table.slice(0, 5), folder / "train-00000.parquet")
    pq.write_table(table.slice(5), folder / "train-00001.parquet")
    bucket = Bucket(name=server.bucket, prefix="raydata", endpoint_url=server.endpoint, region="us-east-1")
    split = publish(folder, md5="f" * 32 + ".dir", bucket=bucket)
    ds = ray.data.read_parquet(split.files("train-*.parquet"), filesystem=split.filesystem)
    rows = sorted(ds.take_all(), key=lambda r: r["id"])  # read by Ray tasks, in worker processes
    assert [(r["id"], r["label"]) for r in rows] == sorted(
        zip(table["id"].to_pylist(), range(10), strict=True)
    )
