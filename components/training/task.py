"""The contract between the training loop and a model family.

The loop knows nothing about the model: a family hands it a `Task` with its modules, its optimizers
and named update phases (minGPT's trainer "has nothing to do with GPT"). Adversarial models are two
phases, not an `optimizer_idx` branch inside one loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Images (data/processed): "image" (B, C, H, W) float in [-1, 1], "label" (B,) int64.
# Tokens (data/tokens): "tokens" (B, h, w) int64, "latent" (B, D, h, w) float32, "label" (B,) int64.
Batch = dict[str, torch.Tensor]
Wrap = Callable[[nn.Module], nn.Module]  # identity in one process, DDP under Ray Train


@dataclass(frozen=True)
class Phase:
    """One named update: which optimizer steps, how often, and from which step on."""

    name: str
    optimizer: str
    every: int = 1  # run on global steps where step % every == 0
    repeats: int = 1  # updates per active step, each on a fresh batch (e.g. 5 critic steps, WGAN-GP)
    start_step: int = 0  # inactive before this global step (e.g. the VQGAN discriminator start)

    def active(self, step: int) -> bool:
        return step >= self.start_step and step % self.every == 0


class Task(ABC):
    """A model family as the training loop sees it."""

    #: Update phases, run in this order within one global step.
    phases: tuple[Phase, ...] = (Phase("main", "main"),)
    #: Name of the module in `modules` whose weights the loop keeps an EMA of (None: no EMA).
    ema_module: str | None = None

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}  # raw modules: state dicts, EMA, export
        self.wrapped: dict[str, nn.Module] = {}  # what forward passes use (DDP-wrapped under Ray)

    @abstractmethod
    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        """Create `self.modules` on `device` and `self.wrapped = {k: wrap(m)}`."""

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per name used by `phases`; called once, after `build`."""

    @abstractmethod
    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for `phase` on `batch` (scalar, to be backpropagated) and detached diagnostics."""

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation metrics over `batches` (run under no_grad, with EMA weights swapped in)."""
        return {}

    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor | None:
        """`n` images in [-1, 1] for a progress grid, or None when the family cannot sample."""
        return None

    def after_update(self, phase: str, *, step: int) -> None:  # noqa: B027 - optional hook
        """Hook after an optimizer step (codebook EMA updates, weight clipping)."""
