"""The promotion gate, its locks and rollback against real MLflow stores: a sqlite file, and `mlflow server`
over HTTP on a sqlite file and on PostgreSQL (where promotions race through the server lock)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.registry.promote import (
    GATE_METRICS,
    LOWER_IS_BETTER,
    PREVIOUS_TAG,
    ROLLED_BACK_TAG,
    LockHeld,
    PromotionRefused,
    apply,
    decide,
    file_lock,
    history,
    lock_model_name,
    registry_lock,
    rollback,
    server_lock,
)
from components.registry.registry import (
    CHALLENGER,
    CHAMPION,
    list_versions,
    record_evaluation,
    register_version,
    set_alias,
    version_by_alias,
)
from tests.components.registry.test_registry import experiment, mlflow_server  # noqa: F401 - the fixture, reused

NAME = "genpipe-diffusion"
JUDGE = "e" * 64
STAMP = {"user": "tester", "time": "2025-01-01T00:00:00+00:00"}


def add_evaluated(uri: str, tmp: Path, *, name: str = NAME, evaluator: str = JUDGE, **metrics: float) -> str:
    """Register a new version and record its evaluation exactly as `evaluate` does (it becomes challenger)."""
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(experiment(uri, tmp)).info.run_id
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "config.json").write_text("{}")
    client.log_artifacts(run_id, str(tmp / "model"), "model")
    tags = {"git_commit": "abc123", "params_hash": "p" * 64, "model_sha256": f"m{run_id}"}
    version = register_version(tracking_uri=uri, name=name, run_id=run_id, artifact_path="model", tags=tags)
    (tmp / "grid.png").write_bytes(b"png")
    record_evaluation(
        tracking_uri=uri,
        name=name,
        version=version,
        metrics=metrics,
        tags={"eval.evaluator_sha256": evaluator, "eval.options": "defaults"},
        artifact=tmp / "grid.png",
    )
    return version


def rows(uri: str, name: str = NAME) -> dict[str, dict]:
    return {r["version"]: r for r in list_versions(tracking_uri=uri, name=name)}


def verdict(tags: dict[str, str]) -> dict:
    """The promotion record on a version (tag promote.record, JSON)."""
    return json.loads(tags["promote.record"])


def gate(uri: str, *, metric: str = "fid_over_floor", margin: float = 0.0):
    now = list(rows(uri).values())
    by = lambda alias: next((r for r in now if alias in r["aliases"]), None)  # noqa: E731
    return decide(challenger=by(CHALLENGER), champion=by(CHAMPION), metric=metric, margin=margin)


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An empty sqlite store, made once: creating one runs every schema migration (seconds each)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    # In its own process: a connection this process kept open could still commit into the file after
    # the copy (a copy once missed the last migration after a test had registered versions).
    make = f"from mlflow import MlflowClient; MlflowClient(tracking_uri='sqlite:///{path}').search_registered_models()"
    subprocess.run([sys.executable, "-c", make], check=True, capture_output=True)
    return path


STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORES)
def store(request, tmp_path: Path, empty_db: Path) -> str:
    """A sqlite file (the file lock), or `mlflow server` over PostgreSQL (the server lock), empty."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_registry")
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(params=STORES)
def http_store(request) -> str:
    """`mlflow server` over HTTP: on a sqlite file, or on PostgreSQL."""
    return request.getfixturevalue(
        {"sqlite": "mlflow_server", "postgres": "postgres_registry"}[request.param]
    )


def test_first_promotion_without_champion(store: str, tmp_path: Path):
    v1 = add_evaluated(store, tmp_path, fid_over_floor=2.0)
    decision = gate(store)
    assert decision.promote and decision.champion is None and decision.reason == "no champion yet"
    apply(store, decision, record=STAMP)
    assert version_by_alias(tracking_uri=store, name=NAME, alias=CHAMPION) == v1
    tags = rows(store)[v1]["tags"]
    assert tags["promote.decision"] == "promoted" and verdict(tags)["against"] == "none"
    assert verdict(tags)["user"] == "tester" and PREVIOUS_TAG not in tags


@pytest.mark.parametrize(
    ("store", "metric"),
    [("sqlite", m) for m in GATE_METRICS]  # the rule is the store's business only in moving the alias:
    + [pytest.param("postgres", m, marks=pytest.mark.postgres) for m in ("fid_over_floor", "cond_accuracy")],
    indirect=["store"],
)
def test_gate_never_promotes_a_worse_or_equal_model(store: str, tmp_path: Path, metric: str):
    good, bad = (1.0, 2.0) if metric in LOWER_IS_BETTER else (0.9, 0.5)
    v1 = add_evaluated(store, tmp_path, **{metric: good})
    set_alias(tracking_uri=store, name=NAME, alias=CHAMPION, version=v1)
    for figure in (bad, good):  # worse, then a tie
        v = add_evaluated(store, tmp_path, **{metric: figure})
        decision = gate(store, metric=metric)
        assert not decision.promote
        apply(store, decision, record=STAMP)
        assert version_by_alias(tracking_uri=store, name=NAME, alias=CHAMPION) == v1
        assert rows(store)[v]["tags"]["promote.decision"] == "kept"
    better = 0.5 if metric in LOWER_IS_BETTER else 0.95
    v4 = add_evaluated(store, tmp_path, **{metric: better})
    apply(store, gate(store, metric=metric), record=STAMP)
    assert version_by_alias(tracking_uri=store, name=NAME, alias=CHAMPION) == v4
    assert rows(store)[v4]["tags"][PREVIOUS_TAG] == v1


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # the rule alone: decide() is pure
@pytest.mark.parametrize(
    ("metric", "champion", "challenger", "margin", "promote"),
    [
        ("fid_over_floor", 2.0, 1.9, 0.2, False),  # better, but not by the margin
        ("fid_over_floor", 2.0, 1.7, 0.2, True),
        ("cond_accuracy", 0.90, 0.91, 0.05, False),
        ("cond_accuracy", 0.90, 0.96, 0.05, True),
    ],
)
def test_margin(store: str, tmp_path: Path, metric, champion, challenger, margin, promote):
    v1 = add_evaluated(store, tmp_path, **{metric: champion})
    set_alias(tracking_uri=store, name=NAME, alias=CHAMPION, version=v1)
    add_evaluated(store, tmp_path, **{metric: challenger})
    decision = gate(store, metric=metric, margin=margin)
    assert decision.promote is promote and decision.champion == v1 and str(margin) in decision.rule


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_refusals(store: str, tmp_path: Path):
    v1 = add_evaluated(store, tmp_path, fid_over_floor=2.0)
    set_alias(tracking_uri=store, name=NAME, alias=CHAMPION, version=v1)
    add_evaluated(store, tmp_path, fid_over_floor=1.0, evaluator="f" * 64)
    with pytest.raises(PromotionRefused, match="different evaluators"):
        gate(store)
    with pytest.raises(PromotionRefused, match="no cond_accuracy in its eval.figures"):
        gate(store, metric="cond_accuracy")
    with pytest.raises(ValueError, match="valid: .*bits_per_dim"):
        gate(store, metric="loss")
    with pytest.raises(ValueError, match="margin"):
        gate(store, margin=-1)
    assert version_by_alias(tracking_uri=store, name=NAME, alias=CHAMPION) == v1


def test_champion_moved_after_deciding_is_refused(store: str, tmp_path: Path):
    v1 = add_evaluated(store, tmp_path, fid_over_floor=2.0)
    stale = gate(store)  # no champion when decided
    set_alias(tracking_uri=store, name=NAME, alias=CHAMPION, version=v1)
    add_evaluated(store, tmp_path, fid_over_floor=3.0)
    with pytest.raises(PromotionRefused, match="champion moved from none to v1"):
        apply(store, stale, record=STAMP)
    assert PREVIOUS_TAG not in rows(store)[v1]["tags"] and "promote.decision" not in rows(store)[v1]["tags"]


def test_rollback_restores_previous_and_refuses_without_one(store: str, tmp_path: Path):
    with pytest.raises(PromotionRefused, match="no champion"):
        rollback(store, NAME, expected=None, record=STAMP)
    v1 = add_evaluated(store, tmp_path, fid_over_floor=2.0)
    apply(store, gate(store), record=STAMP)
    with pytest.raises(PromotionRefused, match="replaced no earlier champion"):
        rollback(store, NAME, expected=v1, record=STAMP)
    v2 = add_evaluated(store, tmp_path, fid_over_floor=1.0)
    apply(store, gate(store), record=STAMP)
    with pytest.raises(PromotionRefused, match="moved"):
        rollback(store, NAME, expected=v1, record=STAMP)
    assert rollback(store, NAME, expected=v2, record=STAMP) == (v2, v1)
    assert version_by_alias(tracking_uri=store, name=NAME, alias=CHAMPION) == v1
    assert (
        rows(store)[v2]["tags"][ROLLED_BACK_TAG]
        == f"champion back to v{v1}; user=tester time={STAMP['time']}"
    )
    # The rolled-back version still holds `challenger`, but the gate never promotes it again.
    decision = gate(store)
    assert not decision.promote and "rolled back" in decision.reason and decision.challenger == v2
    assert apply(store, decision, record=STAMP) is False
    assert version_by_alias(tracking_uri=store, name=NAME, alias=CHAMPION) == v1
    assert [(e["n"], e["decision"]) for e in history(store, NAME)] == [
        (1, "promoted"),
        (2, "promoted"),
        (3, "rolled_back"),
    ]


def test_file_lock_excludes_a_second_holder(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with registry_lock(uri, NAME, timeout=1):
        lock = tmp_path / f".mlflow.db.{lock_model_name(NAME)}.lock"
        assert lock.is_file()
        with (
            pytest.raises(LockHeld, match=r"still held after waiting 0.2 s, by .* pid \d+"),
            file_lock(lock, timeout=0.2),
        ):
            pass
    with file_lock(lock, timeout=0.2):  # released
        pass


def test_server_lock_and_promotion_over_http(http_store: str, tmp_path: Path):
    uri = http_store
    client = MlflowClient(tracking_uri=uri)
    # What older genpipe left when its holder was killed: a registered model listed as a model.
    client.create_registered_model(lock_model_name(NAME), tags={"genpipe.lock_owner": "old:1:x"})
    with registry_lock(uri, NAME, timeout=5) as lease:
        held = client.get_experiment(lease.experiment_id)
        assert held.name.startswith("genpipe-lock.diffusion.") and held.lifecycle_stage == "active"
        assert held.tags["genpipe.lock.pid"] == str(os.getpid())
        assert not client.search_registered_models("name LIKE 'genpipe-lock%'")  # no lock among the models
        with (
            pytest.raises(
                LockHeld, match=rf"still held after waiting 0.5 s, by .* pid {os.getpid()}.*--experiment-id"
            ),
            server_lock(uri, NAME, timeout=0.5, break_after=600),
        ):
            pass
    assert client.get_experiment(lease.experiment_id).lifecycle_stage == "deleted"  # released: hidden
    with server_lock(uri, NAME, timeout=5) as again:  # the next generation
        assert again.generation == lease.generation + 1
    # The gate end to end through the server.
    v1 = add_evaluated(uri, tmp_path, fid_over_floor=2.0)
    with registry_lock(uri, NAME):
        apply(uri, gate(uri), record=STAMP)
    v2 = add_evaluated(uri, tmp_path, fid_over_floor=1.0)
    with registry_lock(uri, NAME):
        apply(uri, gate(uri), record=STAMP)
    assert version_by_alias(tracking_uri=uri, name=NAME, alias=CHAMPION) == v2
    assert rows(uri)[v2]["tags"][PREVIOUS_TAG] == v1
    assert [r["name"] for r in list_versions(tracking_uri=uri)] == [NAME, NAME]
    assert [e["challenger"] for e in history(uri, NAME)] == [v1, v2]


RACER = """
import sys, time
from pathlib import Path
from components.registry.promote import PromotionRefused, apply, decide, registry_lock
from components.registry.registry import list_versions

uri, go = sys.argv[1], Path(sys.argv[2])
now = list_versions(tracking_uri=uri, name="genpipe-diffusion")
by = lambda alias: next((r for r in now if alias in r["aliases"]), None)
# every racer decides against the same champion ...
decision = decide(challenger=by("challenger"), champion=by("champion"), metric="fid_over_floor", margin=0.0)
STAMP = {"user": sys.argv[3], "time": "2025-01-01T00:00:00+00:00"}
(go.parent / f"ready-{sys.argv[3]}").touch()
while not go.exists():
    time.sleep(0.02)
try:  # ... then all rush for the lock at once
    with registry_lock(uri, "genpipe-diffusion", timeout=60):
        apply(uri, decision, record=STAMP)
    print("applied")
except PromotionRefused as err:
    print(f"refused: {err}")
"""


def test_racing_promotions_leave_one_consistent_champion(store: str, tmp_path: Path):
    import subprocess
    import sys

    from tests.conftest import REPO

    v1 = add_evaluated(store, tmp_path, fid_over_floor=2.0)
    set_alias(tracking_uri=store, name=NAME, alias=CHAMPION, version=v1)
    v2 = add_evaluated(store, tmp_path, fid_over_floor=1.0)
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, store, str(go), f"racer{i}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-racer{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in racers), [
            p.communicate() for p in racers
        ]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120) for p in racers]
    results = [out.strip().splitlines()[-1] for out, _ in outs]
    assert sorted(r.split(":")[0] for r in results) == ["applied", "refused"], outs
    assert "champion moved from v1 to v2" in next(r for r in results if r.startswith("refused"))
    tags = rows(store)[v2]["tags"]
    assert version_by_alias(tracking_uri=store, name=NAME, alias=CHAMPION) == v2
    assert (
        tags[PREVIOUS_TAG] == v1 and verdict(tags)["against"] == v1 and tags["promote.decision"] == "promoted"
    )
    winner = f"racer{results.index('applied')}"
    assert verdict(tags)["user"] == winner


def test_stale_reason_on_this_host():
    import subprocess
    import sys

    from components.registry.locks import me, stale_reason

    alive, now = me(), time.time()
    assert stale_reason(alive, now, break_after=600) is None
    assert stale_reason({**alive, "pid_start": "0.00"}, now, break_after=600) is None  # start unknown
    assert "now another process" in stale_reason({**alive, "pid_start": "12.00"}, now, break_after=600)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    reason = stale_reason({**alive, "pid": gone.stdout.strip()}, now, break_after=600)
    assert reason == f"its process (pid {gone.stdout.strip()}) is gone from this host"
    elsewhere = {**alive, "host": "elsewhere"}
    assert stale_reason(elsewhere, now - 30, break_after=600) is None
    assert "over the break age of 10 s" in stale_reason(elsewhere, now - 30, break_after=10)
