"""Ray Train checkpoints in the bucket (moto, tests/s3.py).

A tiny real fit() (the training tests' toy regression) with `train.storage_path=s3://...`: its
checkpoints are objects in the bucket, and a second fit with the same run name resumes from them.
The workers write them with the credentials of the environment Ray was started in, as on a real
node: the S3 filesystem Ray hands them carries the endpoint, not the keys.
"""

from __future__ import annotations

import importlib
from functools import partial

import numpy as np
import pytest
import ray
import torch

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
