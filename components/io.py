"""Atomic file writes and the exported-model format (`model.safetensors` + `config.json`)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, then rename over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are ordinary folders
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write `model.safetensors` and `config.json` into directory `path`, atomically."""
    with atomic_dir(path) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", config)


MODEL_FILES = ("model.safetensors", "config.json")


def load_model(path: str | Path | Mapping[str, bytes]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an exported model directory, or the bytes of its files (`model_files`); a missing file
    is a one-line error naming it."""
    if isinstance(path, Mapping):
        return load_safetensors(path["model.safetensors"]), json.loads(path["config.json"])
    path = _exported(path)
    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


def model_files(path: str | Path) -> dict[str, bytes]:
    """An exported model directory's files as bytes: what a Ray worker or actor on a node that has
    no copy of the directory gets instead of its path (load_model takes either)."""
    path = _exported(path)  # a missing file is a one-line error here, in the driver
    return {name: (path / name).read_bytes() for name in MODEL_FILES}


def weights_sha256(path: str | Path) -> str:
    """sha256 of an exported model's `model.safetensors`, read in chunks: the key that ties a
    registered version, a token set and a judged report to the same weights."""
    weights = Path(path) / "model.safetensors"
    with weights.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _exported(path: str | Path) -> Path:
    path = Path(path)
    for name in MODEL_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: is {path} an exported genpipe model?")
    return path


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the allocator's freed pages back to the OS (glibc's malloc_trim(0)).

    A streaming pass frees a few MiB of batch tensors and decoded arrays per batch. glibc's dynamic
    mmap threshold soon serves such sizes from the heap, where freed chunks stay resident: the
    judge's pass over 200k images peaked at 1.35 GiB against 0.64 GiB at 20k (BENCHMARKS.md,
    "Scale"). The streaming passes (components/evaluation/batches.py, encode's actors) call it
    after each batch (a heap walk: well under a millisecond here), so a pass costs one batch
    whatever the split's size.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
