"""The loop under a real local Ray Train: DDP parity, a killed worker, a killed driver, the NaN guard.

The toy is full-batch least squares (one global batch = the whole data set, no noise), so every
correct run computes the same weights whatever the worker count, data order or restarts: DDP's
gradient mean over equal shards equals the one-process mean up to float summation order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import pytest
import ray
import torch

from components.training.config import LoopConfig, TrainConfig
from components.training.loop import NonFiniteError, train
from components.training.ray_adapter import fit, resolve_precision, storage_uri, worker_env

N = 8  # samples = the global batch
ATOL = 1e-6  # float32 summation order: 2 shards of 4 vs 1 of 8
LOOP = dict(batch_size=N, lr=0.1, schedule="cosine", warmup_steps=1, grad_clip=None, log_every=1)


@pytest.fixture(scope="module")
def ray_local(toy, fast_controller):
    """One local Ray for this module (with the fast controller poll)."""
    if ray.is_initialized():
        ray.shutdown()
    # Logical CPUs: 2 one-CPU workers plus room for Ray Data; the tests stay light on real cores.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(toy)  # conftest is not importable inside workers
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _plain_weights(toy, steps: int) -> torch.Tensor:
    """The reference: the same training in this process."""
    task = toy.RegressionTask()
    train(
        task,
        loop=LoopConfig(steps=steps, **LOOP),
        batches=toy.loader_batches(toy.make_data(N), batch_size=N),
        device=torch.device("cpu"),
        progress=False,
    )
    return task.modules["net"].weight.detach()


def _train_cfg(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"num_workers": 2, "storage_path": str(tmp_path / "ray"), "max_failures": 0, **kw})


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _events(toy, path: Path, name: str) -> list[dict]:
    return [e for e in toy.read_jsonl(path) if e["event"] == name]


def test_one_and_two_workers_match_the_plain_loop(ray_local, toy, tmp_path):
    ds = ray.data.from_items(toy.ray_rows(toy.make_data(N)))
    weights, results = {}, {}
    for workers in (1, 2):
        sink = tmp_path / f"w{workers}.jsonl"
        result = fit(
            task_factory=toy.RegressionTask,
            loop=LoopConfig(steps=5, **LOOP),
            train=_train_cfg(tmp_path, num_workers=workers),
            run_name=f"parity-{workers}",
            datasets={"train": ds, "val": ds},
            sink_factory=partial(toy.JsonlSink, str(sink)),
        )
        assert _steps(sink) == [1, 2, 3, 4, 5]
        assert result.resumed_from is None and result.path.startswith(str(tmp_path))
        weights[workers] = result.module_states(ema_module=None)["net"]["weight"]
        results[workers] = result
    reference = _plain_weights(toy, 5)
    torch.testing.assert_close(weights[1], reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights[2], reference, atol=ATOL, rtol=0)
    # val/mse is each rank's shard mean averaged over ranks: equal shards make it the global mean.
    assert results[2].metrics["val/mse"] == pytest.approx(results[1].metrics["val/mse"], abs=1e-5)
    assert results[2].state()["step"] == 5

    # Same name and storage path again: Ray hands back the finished run's checkpoint, nothing retrains.
    again = fit(
        task_factory=toy.RegressionTask,
        loop=LoopConfig(steps=5, **LOOP),
        train=_train_cfg(tmp_path, num_workers=1),
        run_name="parity-1",
        datasets={"train": ds, "val": ds},
        sink_factory=partial(toy.JsonlSink, str(tmp_path / "w1.jsonl")),
    )
    assert again.resumed_from == 5 and again.metrics == results[1].metrics
    assert _steps(tmp_path / "w1.jsonl") == [1, 2, 3, 4, 5]


def test_two_phases_with_accumulation_under_ddp_match_the_plain_loop(ray_local, toy, tmp_path):
    # Two DDP-wrapped modules, two optimizers, repeats, start_step and no_sync on the first micro-batch.
    loop = LoopConfig(steps=6, grad_accum=2, **LOOP)
    result = fit(
        task_factory=toy.TwoPhaseTask,
        loop=loop,
        train=_train_cfg(tmp_path),
        run_name="phases",
        datasets={"train": ray.data.from_items(toy.ray_rows(toy.make_data(N)))},
    )
    reference = toy.TwoPhaseTask()
    train(
        reference,
        loop=loop,
        batches=toy.loader_batches(toy.make_data(N), batch_size=N // 2),
        device=torch.device("cpu"),
        progress=False,
    )
    got = result.module_states(ema_module=None)
    for name in ("g", "d"):
        for key, value in reference.modules[name].state_dict().items():
            torch.testing.assert_close(got[name][key], value, atol=ATOL, rtol=0)
    torch.manual_seed(0)  # what build() drew: g moved, in its one active step (s=4)
    assert not torch.allclose(got["g"]["weight"], torch.nn.Linear(4, 4).weight)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, toy, tmp_path):
    events, sink = tmp_path / "events.jsonl", tmp_path / "metrics.jsonl"
    faults = toy.Faults(
        crash_at=6,
        marker=str(tmp_path / "crashed"),
        events=str(events),
        wait_for=str(tmp_path / "ray" / "worker-crash" / "checkpoint_manager_snapshot.json"),
    )
    result = fit(
        task_factory=partial(toy.RegressionTask, faults=faults),
        loop=LoopConfig(steps=10, checkpoint_every=4, **LOOP),
        train=_train_cfg(tmp_path, max_failures=1),
        run_name="worker-crash",
        datasets={"train": ray.data.from_items(toy.ray_rows(toy.make_data(N)))},
        sink_factory=partial(toy.JsonlSink, str(sink)),
    )
    assert (tmp_path / "crashed").exists()
    assert result.resumed_from == 4
    assert sorted(e["step"] for e in _events(toy, events, "first_step")) == [
        0,
        0,
        4,
        4,
    ]  # two attempts x 2 ranks
    # Every worker process, the restarted one included, started with the adapter's malloc settings.
    assert {json.dumps(e["env"]) for e in _events(toy, events, "build")} == {json.dumps(worker_env())}
    assert _steps(sink) == list(range(1, 11))  # 5 and 6 ran twice, were logged once
    assert result.state()["step"] == 10 and result.metrics["lr/main"] == pytest.approx(0.01)
    torch.testing.assert_close(
        result.module_states(ema_module=None)["net"]["weight"], _plain_weights(toy, 10), atol=ATOL, rtol=0
    )


def test_nonfinite_fails_fast_without_retries(ray_local, toy, tmp_path):
    events = tmp_path / "events.jsonl"
    faults = toy.Faults(nonfinite_at=2, events=str(events))
    with pytest.raises(NonFiniteError, match="step 3: loss 'main/loss' is nan"):
        fit(
            task_factory=partial(toy.RegressionTask, faults=faults),
            loop=LoopConfig(steps=5, **LOOP),
            train=_train_cfg(tmp_path, num_workers=1, max_failures=2),
            run_name="nan",
            datasets={"train": ray.data.from_items(toy.ray_rows(toy.make_data(N)))},
        )
    assert len(_events(toy, events, "build")) == 1  # Ray did not retry a deterministic failure


DRIVER = """
import importlib.util, sys
from functools import partial
import ray
spec = importlib.util.spec_from_file_location("toy_conftest", {conftest!r})
toy = sys.modules["toy_conftest"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy)
ray.init(address={address!r}, log_to_driver=False)
ray.cloudpickle.register_pickle_by_value(toy)
from components.training.config import LoopConfig, TrainConfig
from components.training.ray_adapter import fit
faults = toy.Faults(events={events!r}, step_sleep={sleep!r})
fit(task_factory=partial(toy.RegressionTask, faults=faults), loop=LoopConfig(**{loop!r}),
    train=TrainConfig(**{train!r}), run_name="driver-kill",
    datasets={{"train": ray.data.from_items(toy.ray_rows(toy.make_data({n})))}},
    sink_factory=partial(toy.JsonlSink, {sink!r}))
"""


def test_a_killed_driver_resumes_on_the_same_run_name(ray_local, toy, tmp_path):
    events, sink = tmp_path / "events.jsonl", tmp_path / "metrics.jsonl"
    loop = dict(steps=16, checkpoint_every=4, **LOOP)
    cfg = dict(num_workers=2, storage_path=str(tmp_path / "ray"), max_failures=0)
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(DRIVER).format(
            conftest=toy.__file__,
            address=ray_local,
            events=str(events),
            sleep=0.15,
            loop=loop,
            train=cfg,
            n=N,
            sink=str(sink),
        )
    )
    snapshot = Path(storage_uri(cfg["storage_path"])) / "driver-kill" / "checkpoint_manager_snapshot.json"
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not snapshot.exists():  # Ray wrote it: a checkpoint is registered with the run
            assert proc.poll() is None, "the driver exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    _wait_gone([e["pid"] for e in _events(toy, events, "build")])  # Ray reaps the dead driver's workers
    killed_at = max(_steps(sink))
    assert killed_at < 16

    faults = toy.Faults(events=str(events))
    result = fit(
        task_factory=partial(toy.RegressionTask, faults=faults),
        loop=LoopConfig(**loop),
        train=TrainConfig(**cfg),
        run_name="driver-kill",
        datasets={"train": ray.data.from_items(toy.ray_rows(toy.make_data(N)))},
        sink_factory=partial(toy.JsonlSink, str(sink)),
    )
    assert result.resumed_from is not None and result.resumed_from > 0
    assert result.resumed_from % 4 == 0 and result.resumed_from <= killed_at
    assert _steps(sink) == list(range(1, 17))
    torch.testing.assert_close(
        result.module_states(ema_module=None)["net"]["weight"], _plain_weights(toy, 16), atol=ATOL, rtol=0
    )


def _wait_gone(pids: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _alive(pid):
            assert time.monotonic() < deadline, f"worker {pid} outlived its driver by {timeout} s"
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_storage_paths_precision_and_dataset_keys(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage_uri("~/runs") == str(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    assert storage_uri("rel/runs") == str(tmp_path / "rel" / "runs")
    assert storage_uri("s3://bucket/runs") == "s3://bucket/runs"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="need 'train', may have 'val'; unknown \\['test'\\]"):
        fit(
            task_factory=toy.RegressionTask,
            loop=LoopConfig(steps=2, **LOOP),
            train=_train_cfg(tmp_path),
            run_name="x",
            datasets={"train": None, "test": None},
        )
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by num_workers\\*grad_accum=3"):
        fit(
            task_factory=toy.RegressionTask,
            loop=LoopConfig(steps=2, **LOOP),
            train=_train_cfg(tmp_path, num_workers=3),
            run_name="x",
            datasets={"train": None},
        )
