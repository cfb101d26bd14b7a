"""Toy tasks, data and a file-backed metric sink for the training loop tests.

RegressionTask fits y = <w*, x> with a bias-free linear model (optionally with input noise drawn from
the global RNG, so exact resume must restore it); TwoPhaseTask is a GAN-shaped pair of updates
("d" twice per step, "g" every other step from step 3) that records which phase ran when.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.training.task import Batch, Phase, Task

torch.set_num_threads(1)

W_STAR = torch.tensor([1.0, -2.0, 0.5, 3.0])


class Interrupted(RuntimeError):
    """Raised by a toy task to stop a run mid-way (a stand-in for a killed process)."""


@dataclass(frozen=True)
class Faults:
    """Where a toy task misbehaves (0-based global steps); None: never."""

    interrupt_at: int | None = None  # raise Interrupted
    crash_at: int | None = None  # os._exit(1) on rank 0, once (guarded by `marker`)
    marker: str | None = None
    nonfinite_at: int | None = None
    nonfinite_in: str = "loss"  # "loss" or "diagnostic"
    events: str | None = None  # JSON-lines file: build and first step of each attempt, per rank
    step_sleep: float = 0.0  # seconds per step, to leave time to kill a run from outside
    # Crash only once this file exists: Ray's checkpoint_manager_snapshot.json, written when the
    # controller has registered a reported checkpoint. A report the controller has not polled yet
    # is lost with the worker, so crashing earlier makes the resume step depend on timing.
    wait_for: str | None = None


class RegressionTask(Task):
    """Least squares on a linear model: the loss is a mean, so DDP's gradient average is exact."""

    ema_module = "net"

    def __init__(self, *, lr: float = 0.1, opt: str = "sgd", noise: float = 0.0, faults: Faults = Faults()):
        super().__init__()
        self.lr, self.opt, self.noise, self.faults = lr, opt, noise, faults
        self.first_step: int | None = None

    def build(self, *, device, wrap) -> None:
        self.modules = {"net": nn.Linear(4, 1, bias=False).to(device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}
        _event(self.faults, "build")

    def optimizers(self):
        params = self.modules["net"].parameters()
        if self.opt == "adam":
            return {"main": torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)}
        return {"main": torch.optim.SGD(params, lr=self.lr)}

    def step(self, phase: str, batch: Batch, *, step: int):
        self._faults(step)
        x = batch["image"].flatten(1)  # (B, 1, 2, 2) -> (B, 4)
        y = x @ W_STAR.to(x.device)
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        err = self.wrapped["net"](x).squeeze(1) - y
        loss = err.pow(2).mean()
        aux = err.abs().mean().detach()
        if self.faults.nonfinite_at == step:
            if self.faults.nonfinite_in == "loss":
                loss = loss * float("nan")
            else:
                aux = aux + float("inf")
        return loss, {"mae": aux}

    def _faults(self, step: int) -> None:
        f = self.faults
        if self.first_step is None:
            self.first_step = step
            _event(f, "first_step", step=step)
        if f.step_sleep:
            time.sleep(f.step_sleep)
        if f.interrupt_at == step:
            raise Interrupted(f"interrupted at step {step}")
        if f.crash_at == step and _rank() == 0 and not Path(f.marker).exists():
            deadline = time.time() + 120
            while f.wait_for and not Path(f.wait_for).exists() and time.time() < deadline:
                time.sleep(0.1)
            Path(f.marker).write_text("crashed")
            os._exit(1)

    def evaluate(self, batches):
        errs = []
        for batch in batches:
            x = batch["image"].flatten(1)
            y = x @ W_STAR.to(x.device)
            if self.noise:  # draws from the global RNG: the loop must keep that off the training stream
                x = x + self.noise * torch.randn_like(x)
            errs.append((self.modules["net"](x).squeeze(1) - y).pow(2))
        return {"mse": torch.cat(errs).mean().item()}

    def sample(self, n: int, *, generator: torch.Generator):
        return torch.tanh(torch.randn(n, 1, 2, 2, generator=generator, device=generator.device))


class TwoPhaseTask(Task):
    """Two optimizers and phases shaped like a GAN; records (phase, step, first label) per update."""

    phases = (Phase("d", "d", repeats=2), Phase("g", "g", every=2, start_step=3))

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def build(self, *, device, wrap) -> None:
        self.modules = {"g": nn.Linear(4, 4).to(device), "d": nn.Linear(4, 1).to(device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}

    def optimizers(self):
        return {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in self.modules.items()}

    def step(self, phase: str, batch: Batch, *, step: int):
        self.calls.append((phase, step, int(batch["label"][0])))
        x = batch["image"].flatten(1)
        z = x.flip(1)  # "noise" from the data keeps the toy deterministic across worker counts
        if phase == "d":
            with torch.no_grad():  # no backward through g here: keep DDP's reducer out of it
                fake = self.wrapped["g"](z)
            loss = (self.wrapped["d"](x) - 1).pow(2).mean() + self.wrapped["d"](fake).pow(2).mean()
        else:
            loss = (self.wrapped["d"](self.wrapped["g"](z)) - 1).pow(2).mean()
        return loss, {}


def _rank() -> int:
    from components.training.distributed import rank

    return rank()


def _env() -> dict[str, str | None]:
    """The malloc variables this process started with (the Ray adapter sets them for workers)."""
    return {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def _event(faults: Faults, name: str, **extra) -> None:
    if faults.events is None:
        return
    node = None
    if "ray" in sys.modules:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    with open(faults.events, "a") as f:
        f.write(
            json.dumps(
                {"event": name, "rank": _rank(), "node": node, "pid": os.getpid(), "env": _env(), **extra}
            )
            + "\n"
        )


def ray_rows(data: dict[str, torch.Tensor]) -> list[dict]:
    """The same samples as rows for ray.data.from_items (image float32 (1, 2, 2), label int64)."""
    return [
        {"image": data["image"][i].numpy(), "label": int(data["label"][i])} for i in range(len(data["label"]))
    ]


def make_data(n: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """n samples: "image" (n, 1, 2, 2) in [-1, 1] and "label" = the sample's index."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, 2, 2, generator=g) * 2 - 1, "label": torch.arange(n)}


class _Rows(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["label"])

    def __getitem__(self, i: int) -> Batch:
        return {k: v[i] for k, v in self.data.items()}


def loader_batches(data: dict[str, torch.Tensor], *, batch_size: int, seed: int = 0):
    """batches(epoch): a plain shuffled DataLoader whose order depends only on (seed, epoch)."""
    rows = _Rows(data)

    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True, generator=g)

    return batches


class JsonlSink:
    """A real MetricSink: one JSON line per logged step; last_step() reads the file back."""

    def __init__(self, path: str) -> None:
        self.path = path

    def log(self, metrics: dict[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def last_step(self) -> int:
        return max((r["step"] for r in read_jsonl(self.path)), default=-1)

    def close(self) -> None:
        pass


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_THIS = sys.modules[__name__]  # captured now: other test folders' conftest modules share the name


@pytest.fixture(scope="session")
def toy():
    """This module, for tests that need the toy tasks and helpers."""
    return _THIS


@pytest.fixture(scope="module")
def fast_controller():
    """Ray Train's controller polls every 0.2 s (default 2 s), so report() returns fast in tests."""
    saved = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    yield
    if saved is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = saved


@pytest.fixture(scope="module")
def fresh_ray(toy, fast_controller):
    """A Ray instance of the module's own (not test_ray_train's shared one), stopped after it.

    For tests of what one fit() starts: detached actors (the AutoscalingCoordinator, the
    PlacementGroupCleaner) outlive a fit(), so another module's fits would hide them.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(toy)
    yield
    ray.shutdown()
