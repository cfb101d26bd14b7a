"""Champion/challenger promotion: a metric gate over the versions' `eval.figures`, rollback, a history.

MLflow aliases have no compare-and-set, so every move of `champion` happens inside a lock
(`components.registry.locks`: an flock beside a local store, a sequence of experiments on a
server). Inside the lock the champion is read again; a decision computed against another champion
is refused, never applied. A rolled-back version is tagged `promote.rolled_back` and the gate never
promotes it again. Every decision is appended to the registered model's tags `decision.<n>` (n
counts up under the lock; an existing number is never written again).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.registry.card import (
    DECISION_TAG,
    EVAL_FIGURES,
    EVALUATOR_TAG,
    PREVIOUS_TAG,
    RECORD_TAG,
    ROLLED_BACK_TAG,
    eval_figures,
    refresh_card,
)
from components.registry.locks import (  # noqa: F401 - the lock API, re-exported
    DEFAULT_BREAK_AFTER,
    DEFAULT_TIMEOUT,
    Lease,
    LockHeld,
    check_break_after,
    file_lock,
    local_store_path,
    lock_model_name,
    registry_lock,
    server_lock,
)
from components.registry.registry import CHALLENGER, CHAMPION

#: Gate metrics and which way is better; figures come from each version's `eval.figures` tag (JSON).
LOWER_IS_BETTER = ("fid", "fid_over_floor", "bits_per_dim")
HIGHER_IS_BETTER = ("cond_accuracy", "precision", "recall")
GATE_METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER
HISTORY_PREFIX = "decision."  # registered-model tags decision.<n>: one JSON record per decision


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
    value = eval_figures(version["tags"]).get(metric)
    if value is None:
        raise PromotionRefused(
            f"{version['name']} v{version['version']} ({role}) has no {metric} in its {EVAL_FIGURES} tag: "
            "run `genpipe evaluate` on it"
        )
    return value


def decide(*, challenger: dict | None, champion: dict | None, metric: str, margin: float) -> Decision:
    """The gate over two version rows (as `list_versions` gives them); refuses when it cannot compare."""
    if metric not in GATE_METRICS:
        raise ValueError(f"unknown gate metric {metric!r}; valid: {list(GATE_METRICS)}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin:g}")
    if challenger is None:
        raise PromotionRefused("no version holds the challenger alias: run `genpipe evaluate` first")
    new = _figure(challenger, metric, CHALLENGER)
    judge = challenger["tags"].get(EVALUATOR_TAG, "")
    common = dict(name=challenger["name"], metric=metric, margin=margin, rule=_rule(metric, margin))
    common |= dict(challenger=challenger["version"], challenger_value=new, evaluator_sha256=judge)
    retired = challenger["tags"].get(ROLLED_BACK_TAG)
    if retired and (champion is None or champion["version"] != challenger["version"]):
        old = champion and eval_figures(champion["tags"]).get(metric)
        return Decision(
            **common,
            champion=champion and champion["version"],
            champion_value=None if old is None else float(old),
            promote=False,
            reason=f"v{challenger['version']} was rolled back ({retired}): never promoted again",
        )
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


# --- moves ------------------------------------------------------------------------------------
def _champion_now(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def apply(tracking_uri: str, decision: Decision, *, record: dict[str, str]) -> bool:
    """Inside the lock: check the champion is still the one judged, record the verdict, move the alias.

    False when there is nothing new to record: the challenger already is champion, was rolled back,
    or already carries this same verdict against this same champion (a repeated `dvc repro`).
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    now = _champion_now(client, decision.name)
    if now != decision.champion:
        raise PromotionRefused(
            f"{decision.name} champion moved from {_v(decision.champion)} to {_v(now)} while deciding: run promote again"
        )
    if decision.champion == decision.challenger:
        return False  # a no-op keeps the tags of the promotion that made it champion
    version = client.get_model_version(decision.name, decision.challenger)
    if version.tags.get(ROLLED_BACK_TAG):
        return False  # the rollback's own record says why
    verdict = {
        "against": decision.champion or "none",
        "metric": decision.metric,
        "margin": f"{decision.margin:g}",
        "rule": decision.rule,
        "reason": decision.reason,
        "challenger_value": f"{decision.challenger_value:.6g}",
        "champion_value": "none" if decision.champion_value is None else f"{decision.champion_value:.6g}",
    }
    outcome = "promoted" if decision.promote else "kept"
    before = json.loads(version.tags.get(RECORD_TAG) or "{}")
    same = ("against", "metric", "margin")
    if (
        not decision.promote
        and version.tags.get(DECISION_TAG) == outcome
        and all(before.get(k) == verdict[k] for k in same)
    ):
        return False
    tags = {DECISION_TAG: outcome, RECORD_TAG: json.dumps({**verdict, **record}, sort_keys=True)}
    if decision.promote and decision.champion is not None:
        tags[PREVIOUS_TAG] = decision.champion
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.challenger, key, value)
    append_history(client, decision.name, {**decision.as_record(), "decision": outcome, **record})
    if decision.promote:
        client.set_registered_model_alias(decision.name, CHAMPION, decision.challenger)
        if decision.champion is not None:
            refresh_card(client, decision.name, decision.champion)  # no longer @champion
    refresh_card(client, decision.name, decision.challenger)
    return True


def rollback(
    tracking_uri: str, name: str, *, expected: str | None, record: dict[str, str]
) -> tuple[str, str]:
    """Inside the lock: give `champion` back to the version the current one replaced, and retire the
    current one (tagged `promote.rolled_back`: the gate never promotes it again); (from, to)."""
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
    stamp = " ".join(f"{k}={v}" for k, v in record.items())
    client.set_model_version_tag(
        name, now, ROLLED_BACK_TAG, f"champion back to v{previous}; {stamp}".strip("; ")
    )
    append_history(
        client, name, {"name": name, "decision": "rolled_back", "from": now, "to": previous, **record}
    )
    client.set_registered_model_alias(name, CHAMPION, previous)
    for version in (now, previous):
        refresh_card(client, name, version)
    return now, previous


# --- history ----------------------------------------------------------------------------------
def append_history(client: MlflowClient, name: str, entry: dict) -> int:
    """Inside the lock: add `entry` as the registered model's tag `decision.<n>`, n one past the last."""
    tags = client.get_registered_model(name).tags
    n = 1 + max((int(k[len(HISTORY_PREFIX) :]) for k in tags if _is_history(k)), default=0)
    client.set_registered_model_tag(
        name, f"{HISTORY_PREFIX}{n}", json.dumps({"n": n, **entry}, sort_keys=True)
    )
    return n


def history(tracking_uri: str, name: str) -> list[dict]:
    """Every decision recorded on `name`, oldest first ([] for a model that does not exist)."""
    try:
        tags = MlflowClient(tracking_uri=tracking_uri).get_registered_model(name).tags
    except MlflowException:
        return []
    return [
        json.loads(tags[k])
        for k in sorted((k for k in tags if _is_history(k)), key=lambda k: int(k[len(HISTORY_PREFIX) :]))
    ]


def _is_history(key: str) -> bool:
    return key.startswith(HISTORY_PREFIX) and key[len(HISTORY_PREFIX) :].isdigit()


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
