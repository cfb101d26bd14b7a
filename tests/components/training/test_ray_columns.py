"""Small splits as numpy columns: fit() trains on them like the plain loop does.

Which Ray actors such a fit() saves is tests/components/training/test_ray_trims.py's subject.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from components.training.config import LoopConfig, TrainConfig
from components.training.loop import train
from components.training.ray_adapter import fit

N = 8
LOOP = dict(batch_size=N, lr=0.1, schedule="cosine", warmup_steps=1, grad_clip=None, log_every=1)


def test_columns_train_like_the_plain_loop_without_ray_data_actors(fresh_ray, toy, tmp_path):
    data = toy.make_data(N)
    columns = {"image": data["image"].numpy(), "label": data["label"].numpy().astype(np.int64)}
    sink = tmp_path / "steps.jsonl"
    result = fit(
        task_factory=toy.RegressionTask,
        loop=LoopConfig(steps=4, **LOOP),
        train=TrainConfig(num_workers=1, storage_path=str(tmp_path / "ray"), max_failures=0),
        run_name="columns",
        datasets={"train": columns, "val": {}},  # an empty val split: no val metrics, no error
        sink_factory=partial(toy.JsonlSink, str(sink)),
        owned_instance=True,
    )
    task = toy.RegressionTask()
    train(
        task,
        loop=LoopConfig(steps=4, **LOOP),
        batches=toy.loader_batches(data, batch_size=N),
        device=torch.device("cpu"),
        progress=False,
    )
    weights = result.module_states(ema_module=None)["net"]["weight"]
    torch.testing.assert_close(weights, task.modules["net"].weight.detach(), atol=1e-6, rtol=0)
    assert not any(k.startswith("val/") for k in result.metrics)
