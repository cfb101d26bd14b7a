"""Limits of one pyfunc predict call: a deadline that stops the sampler, and one-line request errors.

Every family runs its network once per sampling step (the denoiser, the prior, the decoder, the
flow, PixelCNN per pixel), so a forward pre-hook on every `nn.Module` of the generator that checks
the clock is a deadline that needs no change in any sampler: past it, the next forward raises, the
sampling loop unwinds and the thread is free again. The hooks are registered once, at load, and read
the deadline of the calling thread, so concurrent requests on one model each keep their own.

Errors reach an HTTP client through MLflow's scoring server, which answers an `MlflowException`
with the status its `error_code` maps to (INVALID_PARAMETER_VALUE: 400, DEADLINE_EXCEEDED: 504,
TEMPORARILY_UNAVAILABLE: 503) and a JSON body of `error_code` and `message`, without a stack trace.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

TIMEOUT_ENV = "GENPIPE_REQUEST_TIMEOUT"  # seconds of sampling per predict call; unset: no deadline
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # set to "true" by MLflow's scoring server
MLFLOW_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # its own 504, default 60 s
SERVING_SHARE = 0.9  # under `mlflow models serve`: stop the work before MLflow answers its own 504


class RequestError(MlflowException, ValueError):
    """A one-line error for the caller; the scoring server answers it with its error code's status.

    The server rewrites a model's error message to `Failed to predict data '<the whole table>'.
    Error: ...` (multi-line, the request echoed back): the first message, set in `__init__`, stays.
    """

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def bad_request(err: Exception) -> RequestError:
    """A ValueError/TypeError of the request as HTTP 400 with its first line."""
    lines = str(err).strip().splitlines()
    return RequestError(lines[0] if lines else type(err).__name__, error_code=INVALID_PARAMETER_VALUE)


def request_timeout() -> float | None:
    """GENPIPE_REQUEST_TIMEOUT seconds; under `mlflow models serve` a share of its timeout; else None."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text and os.environ.get(SERVING_ENV) == "true":
        text = str(float(os.environ.get(MLFLOW_TIMEOUT_ENV) or 60) * SERVING_SHARE)
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return seconds


def modules_of(obj: Any, *, depth: int = 3) -> list[torch.nn.Module]:
    """Every nn.Module reachable from `obj` through attributes, lists and dicts (a few levels deep)."""
    found: dict[int, torch.nn.Module] = {}

    def walk(value: Any, level: int) -> None:
        if isinstance(value, torch.nn.Module):
            found.update((id(m), m) for m in value.modules())
        elif level > 0 and isinstance(value, (list, tuple)):
            for v in value:
                walk(v, level - 1)
        elif level > 0 and isinstance(value, dict):
            for v in value.values():
                walk(v, level - 1)
        elif level > 0 and hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                walk(v, level - 1)

    walk(obj, depth)
    return list(found.values())


class Deadline:
    """Forward pre-hooks on a generator's modules that stop the calling thread's request in time."""

    def __init__(self, generator: Any) -> None:
        self._local = threading.local()
        self.stopping = threading.Event()  # set on server shutdown: every request stops at once
        self.handles = [m.register_forward_pre_hook(self._check) for m in modules_of(generator)]

    def _check(self, module: torch.nn.Module, args: Any) -> None:
        if self.stopping.is_set():
            raise RequestError(
                "the server is shutting down: request stopped", error_code=TEMPORARILY_UNAVAILABLE
            )
        end = getattr(self._local, "end", None)
        if end is not None and time.monotonic() > end[0]:
            raise RequestError(
                f"request stopped after {end[1]:g} s ({TIMEOUT_ENV}): ask for fewer rows or steps",
                error_code=DEADLINE_EXCEEDED,
            )

    @contextmanager
    def limit(self, seconds: float | None) -> Iterator[None]:
        """Within this block the calling thread's forwards raise once `seconds` have passed."""
        self._local.end = None if seconds is None else (time.monotonic() + seconds, seconds)
        try:
            yield
        finally:
            self._local.end = None
