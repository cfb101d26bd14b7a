"""Learning-rate schedules: linear warm-up, then constant, cosine or linear decay to a floor.

The factor is a function of the global step, so every optimizer of a task (generator and
discriminator, critic with 5 repeats) follows the same curve over `LoopConfig.steps`, whatever its
own update count. Cosine decay is SGDR's (Loshchilov & Hutter, 2017, eq. 5) without restarts:
    f(p) = r + (1 - r) * (1 + cos(pi * p)) / 2,  p in [0, 1] the post-warm-up progress, r = min_lr_ratio.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from components.training.config import LoopConfig

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate during global step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        # Linear ramp reaching 1 at step == warmup_steps; starting above 0 so no step is wasted.
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    # p = 0 on the first post-warm-up step and 1 on the last step (steps - 1).
    p = min(1.0, (step - warmup_steps) / max(1, steps - 1 - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return min_lr_ratio + (1 - min_lr_ratio) * (1 - p)


def build_schedulers(
    optimizers: dict[str, torch.optim.Optimizer], *, loop: LoopConfig
) -> dict[str, LambdaLR]:
    """One LambdaLR per optimizer, stepped once per global step by the loop."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            steps=loop.steps,
            warmup_steps=loop.warmup_steps,
            schedule=loop.schedule,
            min_lr_ratio=loop.min_lr_ratio,
        )

    # A plain function (not a partial) keeps the scheduler state dict free of the callable.
    return {name: LambdaLR(opt, lr_lambda=factor) for name, opt in optimizers.items()}
