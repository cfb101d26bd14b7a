"""The locks that serialize champion moves: an flock beside a local store, else a lock on the server.

Why the server lock is a sequence of experiments, not a registered model: MLflow has no
compare-and-set (aliases and tags are upserts), so exclusivity must come from a name the database
keeps unique, on sqlite and on PostgreSQL alike. Two entities have one: registered models (primary
key `name`) and experiments (UNIQUE (workspace, name)). A registered-model lock shows in the UI's
model list as a model (issue 22), and deleting it frees its name, which lets two breakers of a dead
holder both win (delete, create; delete, create). An experiment is hidden from the UI once deleted,
and a deleted experiment keeps its name for good. So the lock on a model is the sequence of
experiments `genpipe-lock.<family>.<generation>` (zero-padded: names sort as numbers):

- held while the highest generation is active, free when it is deleted or none exists;
- taking it is creating generation n+1 over the highest n read: the database lets one racer create
  a name, and a used name never comes back, so a racer that read an old n fails and reads again;
- breaking a dead holder is the same create over an active, stale n: of two breakers one creates
  n+1, the other fails and then sees a fresh holder. No delete-then-create window exists;
- a create that fails with RESOURCE_ALREADY_EXISTS or RESOURCE_DOES_NOT_EXIST (the server re-reads
  the row it collided with for its message, and the holder may have released it meanwhile) means
  "lost this round: read again", never a traceback;
- after its create the taker checks it is the highest generation (guards against `mlflow gc`
  having purged a used name), and a holder checks again before it writes (`Lease.verify`).

Stale: a holder on this host whose pid is gone (or is another process: its start time differs)
is broken at once; any other holder once its lock is older than `break_after` seconds (the server's
creation time against this machine's clock). A user sees an experiment `genpipe-lock.<family>.<n>`
in the experiments list only while a promotion holds it; released generations are deleted (hidden).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

LOCK_PREFIX = "genpipe-lock"
DIGITS = 12
HOLDER_TAGS = ("host", "pid", "pid_start", "user")
#: A create that lost a race: someone else holds that generation, or the row it hit went away.
LOST_RACE = ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")
DEFAULT_TIMEOUT, DEFAULT_BREAK_AFTER = 60.0, 600.0
LEGACY_OWNER_TAG = "genpipe.lock_owner"  # on the registered model that older genpipe used as the lock


class LockHeld(RuntimeError):
    """Waiting for the lock timed out, or the lock was taken from this holder."""


def lock_model_name(name: str) -> str:
    return f"{LOCK_PREFIX}-{name.removeprefix('genpipe-')}"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def process_start(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), None if there is no such process, NaN if unknown."""
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except (psutil.NoSuchProcess, ValueError):
        return None
    except psutil.AccessDenied:  # it exists; its start time is hidden from us
        return math.nan


def me() -> dict[str, str]:
    """Who holds a lock: host, pid, the pid's start time (guards against pid reuse), user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    start = process_start(os.getpid())
    start = 0.0 if start is None or math.isnan(start) else start
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "pid_start": f"{start:.2f}", "user": user}


def describe(holder: dict[str, str], since: float) -> str:
    """`user@host pid N, process started T, holding since T (age)`: who holds a lock, for a message."""
    try:
        started = float(holder.get("pid_start") or 0)
    except ValueError:
        started = 0.0
    began = f", process started {_when(started)}" if started > 0 else ""
    return (
        f"{holder.get('user', '?')}@{holder.get('host', '?')} pid {holder.get('pid', '?')}{began}, "
        f"holding since {_when(since)} ({time.time() - since:.0f} s)"
    )


def stale_reason(holder: dict[str, str], since: float, *, break_after: float) -> str | None:
    """Why a holder may be broken, or None while it may still be alive and working."""
    if holder.get("host") == socket.gethostname() and holder.get("pid", "").isdigit():
        alive = process_start(int(holder["pid"]))
        if alive is None:
            return f"its process (pid {holder['pid']}) is gone from this host"
        with suppress(ValueError):  # an unknown start (NaN, 0) never differs: a live holder stays
            claimed = float(holder.get("pid_start") or "nan")
            if claimed > 0 and abs(alive - claimed) > 1.0:
                return f"pid {holder['pid']} on this host is now another process"
    age = time.time() - since
    if age > break_after:
        return f"held for {age:.0f} s, over the break age of {break_after:g} s"
    return None


def check_break_after(value: float, *, source: str = "break_after") -> float:
    """A break age (or a wait) in seconds: finite and >= 0; else a one-line error naming `source`."""
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{source} must be a number of seconds >= 0, got {value!r}")
    return float(value)


@dataclass
class Lease:
    """What a holder has: which lock, and a check that it still holds it before writing."""

    lock: str
    generation: int = 0
    experiment_id: str | None = None
    client: MlflowClient | None = None

    def verify(self) -> None:
        """Raise LockHeld when another process broke this lock meanwhile (nothing may be written then)."""
        if self.client is None:
            return  # an flock cannot be taken from a live process
        top = _top(self.client, self.lock)
        if top is None or top.experiment_id != self.experiment_id or top.lifecycle_stage != "active":
            who = describe(_holder(top), top.creation_time / 1000) if top else "nobody"
            raise LockHeld(f"{self.lock} was broken while this process held it (now: {who}): nothing written")


# --- the file lock (local stores) -----------------------------------------------------------
def local_store_path(tracking_uri: str) -> Path | None:
    """The file of a sqlite store or the folder of a file store; None for a server or remote DB."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = unquote(parsed.path)
        return Path(path) if path and path != "/:memory:" else None
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


@contextmanager
def file_lock(path: Path, *, timeout: float) -> Iterator[Lease]:
    """An exclusive flock on `path` (created, never removed: removing it would let two racers in).

    The holder writes who it is into the file, so that a waiter that gives up can say who holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockHeld(_file_holder(path, timeout)) from None
                time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({**me(), "since": time.time()}) + "\n")
            handle.flush()
            yield Lease(lock=str(path))
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_holder(path: Path, timeout: float) -> str:
    try:
        holder = json.loads(path.read_text().strip() or "{}")
        who = describe(holder, float(holder["since"]))
    except (OSError, ValueError, KeyError):
        who = "a process that has not said who it is"
    return (
        f"{path} is still held after waiting {timeout:g} s, by {who}; "
        "an flock dies with its process: wait for it, or stop that process"
    )


# --- the server lock (experiments) ----------------------------------------------------------
def _prefix(lock: str) -> str:
    """`genpipe-lock-diffusion` -> `genpipe-lock.diffusion.`, the generations' common prefix."""
    return f"{LOCK_PREFIX}.{lock.removeprefix(LOCK_PREFIX + '-')}."


def _generation(experiment) -> int:
    return int(experiment.name.rsplit(".", 1)[1])


def _top(client: MlflowClient, lock: str):
    """The highest generation of `lock` (active or deleted), or None."""
    found = client.search_experiments(
        view_type=ViewType.ALL,
        max_results=1,
        filter_string=f"name LIKE '{_prefix(lock)}%'",
        order_by=["name DESC"],
    )
    return found[0] if found else None


def _holder(experiment) -> dict[str, str]:
    return {k: experiment.tags.get(f"genpipe.lock.{k}", "") for k in HOLDER_TAGS}


@contextmanager
def server_lock(
    tracking_uri: str,
    name: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    break_after: float = DEFAULT_BREAK_AFTER,
    on_break: Callable[[str], None] | None = None,
) -> Iterator[Lease]:
    """Hold the lock on `name` on the tracking server; `on_break` hears who was broken and why."""
    break_after = check_break_after(break_after)
    client, lock = MlflowClient(tracking_uri=tracking_uri), lock_model_name(name)
    lease = _acquire(
        client, lock, uri=tracking_uri, timeout=timeout, break_after=break_after, on_break=on_break
    )
    _remove_legacy_lock(client, lock)
    try:
        yield lease
    finally:
        with suppress(MlflowException):  # broken and deleted by a breaker already
            client.delete_experiment(lease.experiment_id)


def _acquire(client, lock: str, *, uri: str, timeout: float, break_after: float, on_break) -> Lease:
    deadline, wait = time.monotonic() + timeout, 0.05
    while True:
        top = _top(client, lock)
        broken, why = None, None
        if top is not None and top.lifecycle_stage == "active":
            since = top.creation_time / 1000
            why = stale_reason(_holder(top), since, break_after=break_after)
            if why is None:
                if time.monotonic() > deadline:
                    raise LockHeld(
                        f"{lock} is still held after waiting {timeout:g} s, by {describe(_holder(top), since)}; "
                        f"if that process is gone, break it with GENPIPE_LOCK_BREAK_AFTER=0 (now {break_after:g} s) "
                        f"or `MLFLOW_TRACKING_URI={uri} {sys.executable} -m mlflow experiments delete "
                        f"--experiment-id {top.experiment_id}`"
                    )
                time.sleep(wait * random.uniform(0.5, 1.0))  # jitter: waiters do not poll in step
                wait = min(wait * 1.5, 0.25)
                continue
            broken = top
        generation = _generation(top) + 1 if top is not None else 1
        tags = {f"genpipe.lock.{k}": v for k, v in me().items()}
        if broken is not None:
            tags["genpipe.lock.broke"] = f"generation {_generation(broken)}: {why}"
        try:
            experiment_id = client.create_experiment(f"{_prefix(lock)}{generation:0{DIGITS}d}", tags=tags)
        except MlflowException as err:
            if err.error_code in LOST_RACE:  # another racer took this generation (or released what we hit)
                time.sleep(random.uniform(0.005, 0.02))
                continue
            raise
        lease = Lease(lock=lock, generation=generation, experiment_id=experiment_id, client=client)
        try:
            lease.verify()  # a purged (gc'd) older name can be created again: only the highest holds
        except LockHeld:
            with suppress(MlflowException):
                client.delete_experiment(experiment_id)
            continue
        if broken is not None:
            with suppress(MlflowException):  # tidiness only: n+1 already excludes n's holder
                client.delete_experiment(broken.experiment_id)
            if on_break is not None:
                on_break(
                    f"broke {lock} generation {_generation(broken)}, held by "
                    f"{describe(_holder(broken), broken.creation_time / 1000)}: {why}"
                )
        return lease


def _remove_legacy_lock(client: MlflowClient, lock: str) -> None:
    """Delete the registered model that older genpipe used as this lock, left by a killed holder.

    It showed in the UI as a model; it is recognised by its owner tag and its lack of versions.
    """
    try:
        legacy = client.get_registered_model(lock)
    except MlflowException:
        return  # the usual case: none
    if LEGACY_OWNER_TAG in legacy.tags and not legacy.latest_versions:
        with suppress(MlflowException):
            client.delete_registered_model(lock)


@contextmanager
def registry_lock(
    tracking_uri: str,
    name: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    break_after: float = DEFAULT_BREAK_AFTER,
    on_break: Callable[[str], None] | None = None,
) -> Iterator[Lease]:
    """The lock that serializes alias moves of `name`: a file beside a local store, else on the server."""
    store = local_store_path(tracking_uri)
    if store is None:
        with server_lock(
            tracking_uri, name, timeout=timeout, break_after=break_after, on_break=on_break
        ) as lease:
            yield lease
    else:
        with file_lock(
            store.parent / f".{store.name}.{lock_model_name(name)}.lock", timeout=timeout
        ) as lease:
            yield lease
