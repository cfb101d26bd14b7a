"""Each Ray trim's effect: the actor it saves is absent with it and present without it.

A fresh local instance of its own: the AutoscalingCoordinator and the PlacementGroupCleaner are
detached actors, so a fit() through stock Ray Train elsewhere in the instance would hide whether
the trimmed fit() starts them. Trimmed first, then stock on the same instance.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
import ray
import torch
from ray._private import state  # tests may read Ray internals; components/ and pipelines/ may not

from components.training import ray_trims
from components.training.config import LoopConfig, TrainConfig
from components.training.loop import train
from components.training.ray_adapter import fit

N = 8
LOOP = dict(batch_size=N, lr=0.1, schedule="cosine", warmup_steps=1, grad_clip=None, log_every=1)
# the actor class each start-up trim saves, in Ray 2.60
SAVED = {
    "datasets_callback": "DatasetManager",
    "placement_group_cleaner": "PlacementGroupCleaner",
    "autoscaling_coordinator": "AutoscalingCoordinator",
}


def _actor_classes() -> set[str]:
    """The class names of every actor this instance ever created (dead ones included)."""
    return {a["ActorClassName"] for a in state.actors().values()}


def _started(name: str, classes: set[str]) -> bool:
    return any(SAVED[name] in c for c in classes)


def _fit(toy, tmp_path, run: str) -> None:
    data = toy.make_data(N)
    fit(
        task_factory=toy.RegressionTask,
        loop=LoopConfig(steps=2, **LOOP),
        train=TrainConfig(num_workers=1, storage_path=str(tmp_path / "ray"), max_failures=0),
        run_name=run,
        datasets={"train": {"image": data["image"].numpy(), "label": data["label"].numpy()}},
        owned_instance=True,
    )


def test_each_trim_saves_its_actor_and_stock_ray_starts_it(fresh_ray, toy, tmp_path, monkeypatch):
    """The trimmed fit (small splits as numpy columns, an owned instance) also trains exactly like
    the plain loop; the stock one, on the same instance, starts every actor the trims save."""
    assert ray.__version__.startswith(ray_trims.TESTED_RAY), "a new Ray: re-check every trim, then TESTED_RAY"
    monkeypatch.delenv(ray_trims.OFF_ENV, raising=False)
    data = toy.make_data(N)
    columns = {"image": data["image"].numpy(), "label": data["label"].numpy().astype(np.int64)}
    result = fit(
        task_factory=toy.RegressionTask,
        loop=LoopConfig(steps=4, **LOOP),
        train=TrainConfig(num_workers=1, storage_path=str(tmp_path / "ray"), max_failures=0),
        run_name="trimmed",
        datasets={"train": columns, "val": {}},  # an empty val split: no val metrics, no error
        sink_factory=partial(toy.JsonlSink, str(tmp_path / "steps.jsonl")),
        owned_instance=True,
    )
    task = toy.RegressionTask()
    plain = toy.loader_batches(data, batch_size=N)
    train(task, loop=LoopConfig(steps=4, **LOOP), batches=plain, device=torch.device("cpu"), progress=False)
    weights = result.module_states(ema_module=None)["net"]["weight"]
    torch.testing.assert_close(weights, task.modules["net"].weight.detach(), atol=1e-6, rtol=0)
    assert not any(k.startswith("val/") for k in result.metrics)
    trimmed = _actor_classes()
    assert not [name for name in SAVED if _started(name, trimmed)], trimmed

    monkeypatch.setenv(ray_trims.OFF_ENV, "all")
    _fit(toy, tmp_path, "stock")
    stock = _actor_classes()
    missing = [name for name in SAVED if not _started(name, stock)]
    assert not missing, f"stock Ray Train no longer starts what these trims save: {missing} ({stock})"


def test_the_report_log_trim_quiets_the_logger_ray_logs_reports_under(monkeypatch):
    from ray.train.v2._internal.execution import context

    logger = logging.getLogger(context.__file__)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv(ray_trims.OFF_ENV, "report_log")
    ray_trims.quiet_report_log()
    assert logger.level == logging.NOTSET
    monkeypatch.delenv(ray_trims.OFF_ENV)
    ray_trims.quiet_report_log()
    assert logger.level == logging.WARNING


def test_another_ray_runs_stock_train_with_one_notice(monkeypatch, caplog):
    monkeypatch.delenv(ray_trims.OFF_ENV, raising=False)
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.setattr(ray_trims, "_noticed", [])
    with caplog.at_level(logging.WARNING, logger="genpipe"):
        assert not any(ray_trims.enabled(name) for name in ray_trims.TRIMS)
        trainer = ray_trims.trainer(lambda: None, owned_instance=True)
    assert type(trainer) is ray.train.torch.TorchTrainer
    notices = [r.getMessage() for r in caplog.records if "2.61.0" in r.getMessage()]
    assert len(notices) == 1 and "stock Ray Train" in notices[0]


def test_an_unknown_trim_name_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv(ray_trims.OFF_ENV, "report_log,coordinator")
    with pytest.raises(ValueError, match=r"unknown trim 'coordinator'; valid: all, datasets_callback"):
        ray_trims.enabled("report_log")


BACKPRESSURED = """
import json, time
import ray
from components.training import ray_trims

def busy_loop_cpu():
    ds = ray.data.range_tensor(8000, shape=(32, 32), override_num_blocks=200)  # 64 MiB of rows
    ds = ds.map_batches(lambda b: b, batch_size=None)
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=2 * 1024**2)
    batches = iter(ds.iter_batches(batch_size=100))
    next(batches)
    time.sleep(2)  # the read-ahead fills; from here on the loop can only wait for this consumer
    cpu = time.process_time()
    time.sleep(3)  # the consumer "trains" with blocks queued
    # The iterator stays referenced: closing it (or letting it be collected) stops its execution on
    # another thread, which may still be at it when ray.shutdown() comes, and the process then fails.
    return time.process_time() - cpu, batches

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
stock, first = busy_loop_cpu()
ray_trims.paced_scheduler()  # as init_ray and each Train worker call it; the first loop is paced too
paced, second = busy_loop_cpu()
print(json.dumps({"stock": stock, "paced": paced}))
ray.shutdown()
"""


def test_the_paced_scheduler_stops_ray_datas_busy_loop_while_the_consumer_works():
    # Stock, a backpressured execution re-runs its scheduling step without pause: a busy thread in
    # the consuming process (a Train worker: half the training rate at 200k images on 2 cores). One
    # Ray instance measures both: CPU seconds of this process over 3 s of a busy consumer.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-c", BACKPRESSURED],
        cwd=Path(__file__).resolve().parents[3],
        env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = json.loads(proc.stdout.strip().splitlines()[-1])
    stock, paced = cpu["stock"], cpu["paced"]
    assert stock > 1.0, stock  # the busy loop: most of a core over the 3 s
    assert paced < stock / 4, (paced, stock)
