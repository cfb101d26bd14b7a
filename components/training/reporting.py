"""What the training loop reports: the sinks it writes to, the metric window, the progress line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from components.training import distributed as dist


class MetricSink(Protocol):
    """Where rank 0 sends metrics (MLflow in the pipelines, a JSON-lines file in tests)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` at `step` (one call per step)."""

    def last_step(self) -> int:
        """Highest step already recorded, -1 when none; the loop never logs a step at or below it."""

    def close(self) -> None:
        """Flush and release."""


class SampleSink(Protocol):
    """Receives progress samples on rank 0: images (n, C, H, W) in [-1, 1] on the CPU."""

    def __call__(self, images: torch.Tensor, *, step: int) -> None: ...


@dataclass
class MetricWindow:
    """Sums of per-update metrics since the last log, kept on the device (no sync per step)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)  # wall clock: data, logs, checkpoints
    lrs: dict[str, float] = field(default_factory=dict)  # what the last step used

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def averages(self, *, device: torch.device) -> dict[str, float]:
        """Means over the window and over ranks (a collective: every rank calls it)."""
        keys = sorted(self.sums)
        out: dict[str, float] = {}
        if keys:
            means = torch.stack([self.sums[k].float() / self.counts[k] for k in keys]).to(device)
            out = dict(zip(keys, dist.all_reduce_mean(means).tolist(), strict=True))
        seconds = time.perf_counter() - self.started
        if self.steps > 0 and seconds > 0:
            out["perf/steps_per_s"] = self.steps / seconds
            out["perf/samples_per_s"] = self.samples * dist.world_size() / seconds
        if device.type == "cuda":  # this rank's peak since the run began (rank 0's is what gets logged)
            out["perf/max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out


def print_progress(metrics: dict[str, float], *, done: int, steps: int) -> None:
    print(progress_line(metrics, done=done, steps=steps), flush=True)


def progress_line(metrics: dict[str, float], *, done: int, steps: int) -> str:
    """`step 40/200 | 3.10 it/s | 99 samples/s | ETA 52s | train/loss 0.41`; no rate where none was timed."""
    parts = [f"step {done}/{steps}"]
    rate = metrics.get("perf/steps_per_s", 0.0)
    if rate > 0:  # a validation-only line has no training window behind it
        parts += [f"{rate:.2f} it/s", f"{metrics.get('perf/samples_per_s', 0.0):.0f} samples/s"]
        parts.append(f"ETA {(steps - done) / rate:.0f}s")
    losses = " ".join(
        f"{k} {v:.4g}" for k, v in metrics.items() if k.endswith("/loss") or k.startswith("val/")
    )
    return " | ".join(parts + ([losses] if losses else []))
