"""Where a stage's time goes: wall-clock marks of one stage process, and its one timing line."""

from __future__ import annotations

import time


class StageClock:
    """Wall-clock marks (time.time()) of this stage process, for its one timing line.

    The driver marks `ray`, `data`, `fit` (the end of each step of train_on_ray); the worker's
    `first_step` and `last_step` come back with the fit result. Phases between marks that are
    missing (a stage that resumed nothing to train) are simply left out. After a worker failure
    Ray Train restarts the workers: `worker` onwards are the last attempt's, and the training of the
    attempts that failed (`retried`, read back from the MLflow run) moves from `workers` to `training`.
    """

    PHASES = (  # (name, from mark, to mark)
        ("python", "process", "cli"),  # the interpreter, the CLI
        ("imports", "cli", "imported"),  # the stage's module: torch, mlflow, the components
        ("config+mlflow", "imported", "ray_start"),  # params, inputs, the MLflow run
        ("ray", "ray_start", "ray"),
        ("data", "ray", "data"),
        ("workers", "data", "worker"),  # Train controller, placement group, worker processes
        ("worker setup", "worker", "first_step"),  # process group, data into memory, task build
        ("training", "first_step", "last_step"),
        ("fit return", "last_step", "fit"),
        ("finish", "fit", "end"),
    )

    def __init__(self, process_start: float | None = None) -> None:
        start = process_start if process_start is not None else _process_start()
        self.marks: dict[str, float] = {"process": start}
        self.retried: list[tuple[float, float]] = []  # (start, end) of each failed attempt's training

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def phases(self) -> dict[str, float]:
        m = self.marks
        phases = {name: m[b] - m[a] for name, a, b in self.PHASES if a in m and b in m}
        if self.retried and "workers" in phases:  # failed attempts trained within `workers`' span
            retried = min(sum(end - start for start, end in self.retried), phases["workers"])
            phases["workers"] -= retried
            phases["training"] = phases.get("training", 0.0) + retried
        return phases

    def training_seconds(self) -> float | None:
        return self.phases().get("training")

    def line(self, stage: str) -> str:
        """`stage: 41.2 s = training 19.0 + overhead 22.2 (python 4.1, ray 3.7, ...)`, marking `end` now."""
        self.mark("end")
        total = self.marks["end"] - self.marks["process"]
        phases = self.phases()
        training = phases.pop("training", 0.0)
        detail = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        return (
            f"{stage}: {total:.1f} s = training {training:.1f} + overhead {total - training:.1f} s ({detail})"
        )


PROCESS_START_ENV = "GENPIPE_PROCESS_START"  # the stage server's fork: when its `genpipe` client began


def _process_start() -> float:
    """When this stage's process started: its `genpipe` client's start in a stage server's fork (which
    hands it over in GENPIPE_PROCESS_START, consumed here), else this process's (psutil comes with Ray),
    else now."""
    import os

    handed = os.environ.pop(PROCESS_START_ENV, None)
    if handed is not None:
        return float(handed)
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - only a timing line depends on it
        return time.time()
