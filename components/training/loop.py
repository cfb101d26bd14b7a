"""The one training loop: phases, accumulation, clipping, EMA, bf16 autocast, NaN guard, exact resume.

It knows nothing about the model (minGPT's trainer "has nothing to do with GPT"): a `Task` hands it
modules, optimizers and named update phases. Per global step s (0-based), each active phase runs
`repeats` updates; one update is `grad_accum` micro-batches whose mean gradient is

    g = (1/A) sum_a grad L(x_a),   clipped to ||g||_2 <= loop.grad_clip over its optimizer's params,

then the optimizer steps. After the step the EMA and every LR scheduler advance once. Logs,
validation, samples and checkpoints count completed steps (1..steps). The same code runs in one
process and under Ray Train's DDP (ray_adapter.py), where `batches(epoch)` is this rank's shard.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from components.training import distributed as dist
from components.training.checkpoint import CheckpointIO, State, rng_state, set_rng_state
from components.training.config import LoopConfig
from components.training.ema import EMA
from components.training.reporting import MetricSink, MetricWindow, SampleSink, print_progress
from components.training.schedule import build_schedulers
from components.training.task import Batch, Phase, Task, Wrap

PRECISIONS = ("fp32", "bf16")


class NonFiniteError(FloatingPointError):
    """A loss, diagnostic or gradient norm is NaN or Inf; raised before the optimizer steps."""


def _identity(module: nn.Module) -> nn.Module:
    return module


class _Stream:
    """Micro-batches of consecutive epochs, with the (epoch, batch) position a resume needs."""

    def __init__(self, batches: Callable[[int], Iterable[Batch]], *, epoch: int = 0, batch: int = 0):
        self.batches, self.epoch, self.batch = batches, epoch, batch
        self._it: Iterator[Batch] | None = None

    def next(self) -> Batch:
        if self._it is None:
            self._it = iter(self.batches(self.epoch))
            # Skip what the checkpointed run already consumed of this epoch.
            self.batch = sum(1 for _ in itertools.islice(self._it, self.batch))
        item = next(self._it, None)
        if item is None:
            if self.batch == 0:
                raise ValueError(
                    f"batches(epoch={self.epoch}) yielded no micro-batch; is the data smaller "
                    "than one per-worker micro-batch?"
                )
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
            return self.next()
        self.batch += 1
        return item


@dataclass
class _Run:
    """Everything one `train` call works with."""

    task: Task
    loop: LoopConfig
    device: torch.device
    precision: str
    seed: int
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    ema: EMA | None
    stream: _Stream | None = None
    val_batches: Callable[[], Iterable[Batch]] | None = None
    checkpoint_io: CheckpointIO | None = None
    sink: MetricSink | None = None
    sample_sink: SampleSink | None = None
    num_samples: int = 16
    progress: bool = True
    logged_up_to: int = -1
    latest: dict[str, float] = field(default_factory=dict)
    window: MetricWindow = field(default_factory=MetricWindow)


def train(
    task: Task,
    *,
    loop: LoopConfig,
    batches: Callable[[int], Iterable[Batch]],
    device: torch.device,
    precision: str = "fp32",
    seed: int = 0,
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    wrap: Wrap = _identity,
    checkpoint_io: CheckpointIO | None = None,
    sink: MetricSink | None = None,
    sample_sink: SampleSink | None = None,
    num_samples: int = 16,
    progress: bool = True,
    clock: dict[str, float] | None = None,
) -> dict[str, float]:
    """Train `task` for `loop.steps` global steps, resuming from `checkpoint_io`; the final metrics.

    `batches(epoch)` yields this rank's micro-batches of that epoch; it must give the same batches
    for the same epoch without drawing from the global RNG (exact resume replays the epoch).
    `clock`, if given, receives the wall-clock times (time.time()) of `first_step` and `last_step`
    (when the first step started and the last one, with its checkpoint, ended): the stage's timing line.
    """
    run = _setup(task, loop=loop, device=device, precision=precision, seed=seed, wrap=wrap)
    run.stream, run.val_batches, run.checkpoint_io = _Stream(batches), val_batches, checkpoint_io
    run.sink, run.sample_sink, run.num_samples, run.progress = sink, sample_sink, num_samples, progress
    state = checkpoint_io.restore() if checkpoint_io is not None else None
    start = _restore(run, state) if state is not None else 0
    if start >= loop.steps:
        if start > loop.steps:
            raise ValueError(f"checkpoint is at step {start}, beyond loop.steps={loop.steps}")
        return dict(state["metrics"])  # finished before: nothing to redo
    if sink is not None and dist.is_main():
        run.logged_up_to = sink.last_step()
    run.window = MetricWindow()  # the rate counts from here: not the task build or the restore
    if clock is not None:
        clock["first_step"] = time.time()
    for step in range(start, loop.steps):
        for phase in task.phases:
            if phase.active(step):
                for _ in range(phase.repeats):
                    _update(run, phase, step=step)
        _end_step(run)
        _after_step(run, done=step + 1)
    if clock is not None:
        clock["last_step"] = time.time()
    return dict(run.latest)


def _end_step(run: _Run) -> None:
    """Advance the EMA and the LR clocks once per global step; note the LR the step used."""
    if run.ema is not None:
        run.ema.update()
    run.window.lrs = {f"lr/{n}": s.get_last_lr()[0] for n, s in run.schedulers.items()}
    with warnings.catch_warnings():
        # A phase that has not started yet (start_step) advances its LR clock without an update.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        for scheduler in run.schedulers.values():
            scheduler.step()
    run.window.steps += 1


def _setup(
    task: Task, *, loop: LoopConfig, device: torch.device, precision: str, seed: int, wrap: Wrap
) -> _Run:
    """Seed, build the task and its optimizers, schedulers and EMA; check the task's names."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    _seed_all(seed + dist.rank())
    task.build(device=device, wrap=wrap)
    optimizers = task.optimizers()
    names = [p.name for p in task.phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must be unique, got {names}")
    for phase in task.phases:
        if phase.optimizer not in optimizers:
            raise ValueError(
                f"phase {phase.name!r} uses optimizer {phase.optimizer!r}; the task has {sorted(optimizers)}"
            )
    ema = None
    if loop.ema_decay is not None:
        if task.ema_module not in task.modules:
            raise ValueError(
                f"loop.ema_decay is set but task.ema_module={task.ema_module!r} is not one "
                f"of the modules {sorted(task.modules)}"
            )
        ema = EMA(task.modules[task.ema_module], decay=loop.ema_decay, warmup=loop.ema_warmup)
    for module in task.modules.values():
        module.train()
    schedulers = build_schedulers(optimizers, loop=loop)
    return _Run(task, loop, device, precision, seed, optimizers=optimizers, schedulers=schedulers, ema=ema)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _autocast(run: _Run) -> contextlib.AbstractContextManager:
    if run.precision == "bf16":
        return torch.autocast(device_type=run.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _no_sync(modules: Iterable[nn.Module], *, enabled: bool) -> contextlib.ExitStack:
    """DDP's no_sync on every wrapped module: skip the all-reduce on all but the last micro-batch."""
    stack = contextlib.ExitStack()
    if enabled:
        for m in modules:
            if hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())
    return stack


def _update(run: _Run, phase: Phase, *, step: int) -> None:
    """One optimizer update of `phase`: accumulate, clip, guard, step."""
    task, accum = run.task, run.loop.grad_accum
    opt = run.optimizers[phase.optimizer]
    opt.zero_grad(set_to_none=True)  # drop gradients other phases left on these parameters
    named: list[tuple[str, torch.Tensor]] = []
    for a in range(accum):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in run.stream.next().items()}
        run.window.samples += len(next(iter(batch.values())))
        with _no_sync(task.wrapped.values(), enabled=a < accum - 1):
            with _autocast(run):
                loss, diagnostics = task.step(phase.name, batch, step=step)
            (loss / accum).backward()
        named.append((f"{phase.name}/loss", loss.detach()))
        named += [(f"{phase.name}/{k}", _scalar(v, key=k, phase=phase.name)) for k, v in diagnostics.items()]
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if run.loop.grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, run.loop.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    named.append((f"{phase.name}/grad_norm", norm.detach()))
    _guard(named, step=step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    task.after_update(phase.name, step=step)
    grouped: dict[str, list[torch.Tensor]] = {}
    for k, v in named:
        grouped.setdefault(k, []).append(v.float())
    run.window.add({k: torch.stack(vs).mean() for k, vs in grouped.items()})


def _scalar(value: Any, *, key: str, phase: str) -> torch.Tensor:
    value = torch.as_tensor(value).detach()
    if value.numel() != 1:
        raise ValueError(
            f"phase {phase!r}: diagnostic {key!r} must be a scalar, got shape {tuple(value.shape)}"
        )
    return value.reshape(())


def _guard(named: list[tuple[str, torch.Tensor]], *, step: int) -> None:
    """Raise NonFiniteError on every rank if any rank saw a non-finite value (one sync per update)."""
    values = torch.stack([v.float().to(named[0][1].device) for _, v in named])
    bad = (~torch.isfinite(values)).any().float()
    if dist.all_reduce_sum(bad).item() == 0:
        return
    message = None
    for (name, _), v in zip(named, values.tolist(), strict=True):
        if not np.isfinite(v):
            what = {"loss": "loss", "grad_norm": "gradient norm"}.get(name.rsplit("/", 1)[1], "diagnostic")
            message = f"step {step + 1}: {what} {name!r} is {v} (rank {dist.rank()})"
            break
    first = next(m for m in dist.all_gather_object(message) if m is not None)
    raise NonFiniteError(f"{first}; the optimizer did not step, the last checkpoint is intact")


@contextlib.contextmanager
def _inference(run: _Run) -> Iterator[None]:
    """EMA weights, eval mode, no grad, and an RNG that the training stream never sees."""
    modes = {name: m.training for name, m in run.task.modules.items()}
    saved = rng_state()
    ema = run.ema.swapped() if run.ema is not None else contextlib.nullcontext()
    try:
        with ema, torch.no_grad(), _autocast(run):
            for m in run.task.modules.values():
                m.eval()
            yield
    finally:
        for name, m in run.task.modules.items():
            m.train(modes[name])
        set_rng_state(saved)


def _validate(run: _Run) -> dict[str, float]:
    """task.evaluate over this rank's validation batches, averaged over ranks, as val/<name>."""
    with _inference(run):
        raw = run.task.evaluate(run.val_batches())
    keys = sorted(raw)
    if not keys:
        return {}
    means = dist.all_reduce_mean(
        torch.tensor([float(raw[k]) for k in keys], dtype=torch.float64, device=run.device)
    )
    return {f"val/{k}": v for k, v in zip(keys, means.tolist(), strict=True)}


def _sample(run: _Run, *, done: int) -> None:
    """A progress grid from fixed noise (the same seed every time), on rank 0."""
    with _inference(run):
        generator = torch.Generator(device=run.device).manual_seed(run.seed)
        images = run.task.sample(run.num_samples, generator=generator)
    if images is not None:
        run.sample_sink(images.detach().float().cpu(), step=done)


def _due(every: int, done: int, *, last: bool) -> bool:
    return last or (every > 0 and done % every == 0)


def _after_step(run: _Run, *, done: int) -> None:
    """Log, validate, sample and checkpoint when due (collectives run on every rank)."""
    loop, last = run.loop, done == run.loop.steps
    metrics: dict[str, float] = {}
    if _due(loop.log_every, done, last=last):
        metrics.update(run.window.averages(device=run.device))
        metrics.update(run.window.lrs)
        run.window = MetricWindow()
    if run.val_batches is not None and _due(loop.val_every, done, last=last):
        metrics.update(_validate(run))
    run.latest.update(metrics)
    if metrics and dist.is_main():
        if run.sink is not None and done > run.logged_up_to:
            run.sink.log(metrics, done)
        if run.progress:
            print_progress(metrics, done=done, steps=loop.steps)
    samples_on = run.sample_sink is not None and loop.sample_every > 0 and dist.is_main()
    if samples_on and _due(loop.sample_every, done, last=last):
        _sample(run, done=done)
    if run.checkpoint_io is not None and _due(loop.checkpoint_every, done, last=last):
        run.checkpoint_io.save(_capture(run, done=done), step=done, metrics=dict(run.latest))


def _capture(run: _Run, *, done: int) -> State:
    """The state a resume at `done` needs (see checkpoint.py for the layout)."""
    return {
        "step": done,
        "epoch": run.stream.epoch,
        "batch": run.stream.batch,
        "modules": {n: m.state_dict() for n, m in run.task.modules.items()},
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "optimizers": {n: o.state_dict() for n, o in run.optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in run.schedulers.items()},
        "metrics": dict(run.latest),
        "rng": rng_state(),
    }


def _restore(run: _Run, state: State) -> int:
    """Load `state` into the run; the completed step count to continue from."""
    for kind, have in (("modules", run.task.modules), ("optimizers", run.optimizers)):
        if set(state[kind]) != set(have):
            raise ValueError(
                f"checkpoint {kind} {sorted(state[kind])} do not match the task's {sorted(have)}"
            )
    for name, module in run.task.modules.items():
        module.load_state_dict(state["modules"][name])
    for name, opt in run.optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
        run.schedulers[name].load_state_dict(state["schedulers"][name])
    if run.ema is not None:
        if state["ema"] is None:
            raise ValueError("loop.ema_decay is set but the checkpoint holds no EMA state")
        run.ema.load_state_dict(state["ema"])
    run.stream = _Stream(run.stream.batches, epoch=int(state["epoch"]), batch=int(state["batch"]))
    run.latest = dict(state.get("metrics") or {})
    if state["rng"] is not None:
        set_rng_state(state["rng"])
    else:  # this rank has no saved stream (the world size changed): a fresh, distinct one
        _seed_all((run.seed + dist.rank()) * 1_000_003 + int(state["step"]))
    return int(state["step"])
