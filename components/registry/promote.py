"""Champion/challenger promotion: a metric gate over `eval.*` version tags, a lock, rollback.

MLflow aliases have no compare-and-set, so every move of `champion` happens inside a lock: an
flock on a file beside a local store, or, against a tracking server, a registered model that the
server creates for one racer only (RESOURCE_ALREADY_EXISTS for the others). Inside the lock the
champion is read again; a decision computed against another champion is refused, never applied.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.registry.registry import CHALLENGER, CHAMPION

#: Gate metrics and which way is better; figures come from the `eval.<metric>` version tags.
LOWER_IS_BETTER = ("fid", "fid_over_floor", "bits_per_dim")
HIGHER_IS_BETTER = ("cond_accuracy", "precision", "recall")
GATE_METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER
EVALUATOR_TAG = "eval.evaluator_sha256"
PREVIOUS_TAG = "promote.previous_champion"  # on a new champion: the version it replaced
LOCK_OWNER_TAG = "genpipe.lock_owner"


class PromotionRefused(RuntimeError):
    """The gate cannot decide (missing figures, different judges) or the champion moved meanwhile."""


@dataclass(frozen=True)
class Decision:
    """One gate verdict: what was compared, under which rule, and what to do."""

    name: str
    metric: str
    margin: float
    rule: str
    challenger: str
    champion: str | None
    challenger_value: float
    champion_value: float | None
    evaluator_sha256: str
    promote: bool
    reason: str

    def as_record(self) -> dict:
        return asdict(self)


def _rule(metric: str, margin: float) -> str:
    if metric in LOWER_IS_BETTER:
        return f"challenger {metric} < champion {metric} - {margin:g}"
    return f"challenger {metric} > champion {metric} + {margin:g}"


def _figure(version: dict, metric: str, role: str) -> float:
    raw = version["tags"].get(f"eval.{metric}")
    if raw is None:
        raise PromotionRefused(
            f"{version['name']} v{version['version']} ({role}) has no eval.{metric} tag: run `genpipe evaluate` on it"
        )
    return float(raw)


def decide(*, challenger: dict | None, champion: dict | None, metric: str, margin: float) -> Decision:
    """The gate over two version rows (as `list_versions` gives them); refuses when it cannot compare."""
    if metric not in GATE_METRICS:
        raise ValueError(f"unknown gate metric {metric!r}; valid: {list(GATE_METRICS)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin:g}")
    if challenger is None:
        raise PromotionRefused("no version holds the challenger alias: run `genpipe evaluate` first")
    new = _figure(challenger, metric, CHALLENGER)
    judge = challenger["tags"].get(EVALUATOR_TAG, "")
    common = dict(name=challenger["name"], metric=metric, margin=margin, rule=_rule(metric, margin))
    common |= dict(challenger=challenger["version"], challenger_value=new, evaluator_sha256=judge)
    if champion is None:
        return Decision(**common, champion=None, champion_value=None, promote=True, reason="no champion yet")
    if champion["version"] == challenger["version"]:
        old = _figure(champion, metric, CHAMPION)
        return Decision(
            **common,
            champion=champion["version"],
            champion_value=old,
            promote=False,
            reason="already champion",
        )
    old = _figure(champion, metric, CHAMPION)
    if champion["tags"].get(EVALUATOR_TAG, "") != judge:
        raise PromotionRefused(
            f"{challenger['name']} v{challenger['version']} and champion v{champion['version']} were judged by "
            f"different evaluators ({judge[:12] or 'none'} vs {champion['tags'].get(EVALUATOR_TAG, '')[:12] or 'none'}): "
            "re-evaluate the champion with the current evaluator"
        )
    wins = new < old - margin if metric in LOWER_IS_BETTER else new > old + margin
    verdict = "beats" if wins else "does not beat"
    return Decision(
        **common,
        champion=champion["version"],
        champion_value=old,
        promote=wins,
        reason=f"{metric} {new:.6g} {verdict} {old:.6g}" + (f" by more than {margin:g}" if margin else ""),
    )


# --- locks ------------------------------------------------------------------------------------
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
def file_lock(path: Path, *, timeout: float) -> Iterator[None]:
    """An exclusive flock on `path` (created, never removed: removing it would let two racers in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionRefused(
                        f"{path} is held by another process for over {timeout:g} s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_model_name(name: str) -> str:
    return f"genpipe-lock-{name.removeprefix('genpipe-')}"


@contextmanager
def server_lock(tracking_uri: str, name: str, *, timeout: float, stale_after: float) -> Iterator[None]:
    """A lock the server makes atomic: the registered model `genpipe-lock-<family>` exists for one holder."""
    client = MlflowClient(tracking_uri=tracking_uri)
    lock, owner = lock_model_name(name), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(lock, tags={LOCK_OWNER_TAG: owner}, description=f"lock on {name}")
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _break_if_stale(client, lock, stale_after=stale_after)
        if time.monotonic() > deadline:
            raise PromotionRefused(f"{lock} is held by another promotion for over {timeout:g} s")
        time.sleep(0.2)
    try:
        yield
    finally:
        with suppress(MlflowException):  # release only our own: a stale lock may have been broken and retaken
            if client.get_registered_model(lock).tags.get(LOCK_OWNER_TAG) == owner:
                client.delete_registered_model(lock)


def _break_if_stale(client: MlflowClient, lock: str, *, stale_after: float) -> None:
    """Delete a lock created over `stale_after` seconds ago (its holder died without releasing)."""
    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return  # released meanwhile
    if time.time() - held.creation_timestamp / 1000 > stale_after:
        with suppress(MlflowException):  # another racer broke it first
            client.delete_registered_model(lock)


@contextmanager
def registry_lock(
    tracking_uri: str, name: str, *, timeout: float = 60.0, stale_after: float = 600.0
) -> Iterator[None]:
    """The lock that serializes alias moves of `name`: a file beside a local store, else on the server."""
    store = local_store_path(tracking_uri)
    if store is None:
        with server_lock(tracking_uri, name, timeout=timeout, stale_after=stale_after):
            yield
    else:
        with file_lock(store.parent / f".{store.name}.{lock_model_name(name)}.lock", timeout=timeout):
            yield


# --- moves ------------------------------------------------------------------------------------
def _champion_now(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def apply(tracking_uri: str, decision: Decision, *, record: dict[str, str]) -> None:
    """Inside the lock: check the champion is still the one judged, record the verdict, move the alias."""
    client = MlflowClient(tracking_uri=tracking_uri)
    now = _champion_now(client, decision.name)
    if now != decision.champion:
        raise PromotionRefused(
            f"{decision.name} champion moved from {_v(decision.champion)} to {_v(now)} while deciding: run promote again"
        )
    if decision.champion == decision.challenger:
        return  # a no-op keeps the tags of the promotion that made it champion
    tags = {
        "promote.decision": "promoted" if decision.promote else "kept",
        "promote.against": decision.champion or "none",
        "promote.metric": decision.metric,
        "promote.margin": f"{decision.margin:g}",
        "promote.rule": decision.rule,
        "promote.reason": decision.reason,
        "promote.challenger_value": f"{decision.challenger_value:.6g}",
        "promote.champion_value": "none"
        if decision.champion_value is None
        else f"{decision.champion_value:.6g}",
        **{f"promote.{k}": v for k, v in record.items()},
    }
    if decision.promote and decision.champion is not None:
        tags[PREVIOUS_TAG] = decision.champion
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.challenger, key, value)
    if decision.promote:
        client.set_registered_model_alias(decision.name, CHAMPION, decision.challenger)


def rollback(
    tracking_uri: str, name: str, *, expected: str | None, record: dict[str, str]
) -> tuple[str, str]:
    """Inside the lock: give `champion` back to the version the current one replaced; (from, to)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    now = _champion_now(client, name)
    if now != expected:
        raise PromotionRefused(f"{name} champion moved from {_v(expected)} to {_v(now)}: run rollback again")
    if now is None:
        raise PromotionRefused(f"{name} has no champion to roll back")
    previous = client.get_model_version(name, now).tags.get(PREVIOUS_TAG)
    if not previous:
        raise PromotionRefused(
            f"{name} champion v{now} replaced no earlier champion: nothing to roll back to"
        )
    for key, value in {"rollback.to": previous, **{f"rollback.{k}": v for k, v in record.items()}}.items():
        client.set_model_version_tag(name, now, key, value)
    client.set_registered_model_alias(name, CHAMPION, previous)
    return now, previous


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
