"""Helpers of the zoo tests: tiny in-memory image data, a few loop steps, a JSON-lines sink."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.training.config import LoopConfig
from components.training.loop import train

CPU = torch.device("cpu")


def images(n: int, *, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    """n images on the 8-bit grid in [-1, 1]: x_int / 127.5 - 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 127.5 - 1


def batch(n: int = 4, *, shape=(1, 8, 8), num_classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    labels = torch.arange(n) % num_classes if num_classes else torch.full((n,), -1)
    return {"image": images(n, shape=shape, seed=seed), "label": labels}


class Sink:
    """MetricSink keeping rows in memory."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append({"step": step, **metrics})

    def last_step(self) -> int:
        return max((r["step"] for r in self.rows), default=-1)

    def close(self) -> None:
        pass


def run_task(task, *, steps: int = 3, data: dict[str, torch.Tensor]) -> Sink:
    """Train `task` for `steps` on the in-memory `data` (micro-batches of 4); the metric rows.

    The optimizers take their lr from the task's own LoopConfig, so the loop runs with that one.
    """
    base = task.loop.model_dump()
    cfg = LoopConfig(**{**base, "steps": steps, "batch_size": 4, "log_every": 1, "schedule": "constant"})
    n = data["image"].shape[0]

    def batches(epoch: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n - 3, 4):
            idx = order[i : i + 4]
            yield {k: v[idx] for k, v in data.items()}

    sink = Sink()
    train(
        task, loop=cfg, batches=batches, device=CPU, sink=sink, val_batches=lambda: batches(0), progress=False
    )
    return sink


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
