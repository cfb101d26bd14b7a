"""Training state on disk: what exact resume needs, written atomically, read with weights_only.

A state is a plain dict of tensors, numbers, strings, lists and dicts (so torch's weights-only
loader reads it back, never unpickling code) with these keys:
    step        completed global steps
    epoch       data epoch of the next micro-batch
    batch       micro-batches of that epoch already consumed
    modules     {name: raw (unwrapped) module state dict}
    ema         EMA.state_dict() or None
    optimizers  {name: optimizer state dict};  schedulers  {name: scheduler state dict}
    metrics     the metrics of the step it was taken at
    rng         this rank's torch / cuda / numpy / python RNG states
On disk it is a folder: `state.pt` (everything but rng, written by rank 0) and `rng-<rank>.pt` (one
per rank, so each rank resumes its own random stream).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

State = dict[str, Any]
STATE_FILE = "state.pt"
REQUIRED_KEYS = ("step", "epoch", "batch", "modules", "ema", "optimizers", "schedulers")


class CheckpointIO(Protocol):
    """Where the loop saves and finds its state (a local folder, or Ray Train's storage)."""

    def restore(self) -> State | None:
        """The latest saved state for this rank, or None to start fresh."""

    def save(self, state: State, *, step: int, metrics: dict[str, float]) -> None:
        """Persist `state` taken after `step` (called on every rank; rank 0 writes the shared part)."""


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as weights_only-loadable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 (624,) widened: no uint32 loader
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never half


def save_state(path: str | Path, state: State, *, rank: int = 0) -> None:
    """Write `state` into folder `path`: rank 0 the shared part, every rank its RNG states."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _atomic_save({k: v for k, v in state.items() if k != "rng"}, path / STATE_FILE)
    _atomic_save(state["rng"], path / f"rng-{rank}.pt")


def load_state(path: str | Path, *, rank: int = 0, map_location: str | torch.device = "cpu") -> State:
    """Read a state folder; `rng` is None when this rank has no file (the world size changed)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {STATE_FILE}; not a training state folder")
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path / STATE_FILE}: missing keys {missing}; expected {list(REQUIRED_KEYS)}")
    rng_file = path / f"rng-{rank}.pt"
    state["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return state


def module_states(state: State, *, ema_module: str | None, use_ema: bool = True) -> dict[str, Any]:
    """Module state dicts to export, with the EMA weights in `ema_module` when there are some."""
    out = {name: dict(sd) for name, sd in state["modules"].items()}
    if use_ema and ema_module is not None and state["ema"] is not None:
        if ema_module not in out:
            raise KeyError(f"ema_module {ema_module!r} is not a module of this state; have {sorted(out)}")
        out[ema_module].update(state["ema"]["shadow"])
    return out


class LocalCheckpointIO:
    """Checkpoints as `<root>/step-<step>` folders in one process; keeps the newest `keep`."""

    def __init__(self, root: str | Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep} must be at least 1")
        self.root = Path(root).expanduser().absolute()
        self.keep = keep

    def folders(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())

    def restore(self) -> State | None:
        """The newest checkpoint, or None."""
        folders = self.folders()
        return load_state(folders[-1]) if folders else None

    def save(self, state: State, *, step: int, metrics: dict[str, float]) -> None:
        """Write into a hidden folder, then rename it into place and prune old ones."""
        final = self.root / f"step-{step:09d}"
        tmp = self.root / f".tmp-step-{step:09d}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_state(tmp, state)
        (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.folders()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
