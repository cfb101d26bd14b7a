"""Exponential moving average of a module's parameters (Polyak averaging).

    theta_ema <- beta_t * theta_ema + (1 - beta_t) * theta,   beta_t = min(beta, (1 + t) / (10 + t))

with t the number of updates so far; the warm-up term lets the average forget the random init early
(TensorFlow's ExponentialMovingAverage with num_updates). Buffers (BatchNorm statistics) are not
averaged: the live ones are used, as in EDM's training loop which copies them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Shadow copy of `module`'s floating-point parameters, updated after each global step."""

    def __init__(self, module: nn.Module, *, decay: float, warmup: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay={decay} must lie in (0, 1)")
        self.module = module
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in self._params().items()
        }

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.module.named_parameters() if p.dtype.is_floating_point}

    def decay_at(self, t: int) -> float:
        """beta_t for update number `t` (0-based)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step towards the module's current parameters."""
        beta = self.decay_at(self.updates)
        for name, p in self._params().items():
            self.shadow[name].lerp_(p.detach(), 1 - beta)
        self.updates += 1

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the module holds the EMA weights; the live ones return afterwards."""
        params = self._params()
        live = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(live[name])

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state dict with EMA parameters (what an export should hold)."""
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        state.update({k: v.clone() for k, v in self.shadow.items()})
        return state

    def state_dict(self) -> dict[str, object]:
        """Shadow weights and update count (for checkpoints)."""
        return {"shadow": dict(self.shadow), "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore from `state_dict()`; names must match the module's parameters."""
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) ^ set(shadow))
        if missing:
            raise ValueError(f"EMA state does not match the module; differing parameters: {missing[:5]}")
        with torch.no_grad():
            for name, value in shadow.items():
                self.shadow[name].copy_(value)
        self.updates = int(state["updates"])
