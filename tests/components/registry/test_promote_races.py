"""Promotion under races and crashes against the PostgreSQL-backed `mlflow server` (tests/services.py):
the server lock under contention, a SIGKILLed holder taken over by exactly one of two breakers, and
10 `genpipe promote` processes racing over 5 rounds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from components.registry.locks import _prefix
from components.registry.promote import LockHeld, history, lock_model_name, server_lock
from components.registry.registry import CHAMPION, version_by_alias
from tests.components.registry.test_promote import NAME, add_evaluated
from tests.conftest import REPO, project_env
from tests.services import stop_group

pytestmark = pytest.mark.postgres

HOLDER = """
import sys, time
from pathlib import Path
from components.registry.promote import server_lock
with server_lock(sys.argv[1], "genpipe-diffusion", timeout=60):
    Path(sys.argv[2]).touch()
    time.sleep(600)  # until SIGKILLed: the lock is never released
"""

# One process imports the CLI once (torch and mlflow: ~5 s of CPU) and forks the racers before any
# thread exists: ten imports would cost ~50 s of CPU on a 2-core machine.
WORKER = """
import contextlib, io, json, os, sys, time, traceback
from pathlib import Path
import pipelines.promote
from pipelines.cli import main
folder, n, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def race(me):
    (folder / f"ready-{me}").touch()
    for r in range(rounds):
        while not (folder / f"go-{r}").exists():
            time.sleep(0.01)
        out, err = io.StringIO(), io.StringIO()
        sys.argv = ["genpipe", "promote", "diffusion_pixel"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as done:
                code = done.code or 0
            except BaseException:
                traceback.print_exc()
                code = 99
        result = {"code": code, "out": out.getvalue(), "err": err.getvalue(), "pid": os.getpid()}
        (folder / f"done-{r}-{me}.json").write_text(json.dumps(result))

children = []
for i in range(n):
    pid = os.fork()
    if pid == 0:
        try:
            race(f"w{i}")
        finally:
            os._exit(0)
    children.append(pid)
sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))
"""


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], *, limit: float = 300) -> None:
    deadline = time.time() + limit
    while not all(p.exists() for p in paths):
        dead = [p for p in procs if p.poll() is not None]
        assert not dead and time.time() < deadline, [p.communicate() for p in dead]
        time.sleep(0.05)


def test_lock_under_contention_is_exclusive_and_never_raises(postgres_registry: str):
    uri, inside, most, errors = postgres_registry, [0], [0], []
    guard = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(8):
                with server_lock(uri, NAME, timeout=120):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.005)
                    with guard:
                        inside[0] -= 1
        except BaseException as err:  # any traceback is the bug under test
            errors.append(repr(err))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and most[0] == 1
    client = MlflowClient(tracking_uri=uri)
    generations = client.search_experiments(
        view_type=ViewType.ALL,
        filter_string=f"name LIKE '{_prefix(lock_model_name(NAME))}%'",
        max_results=1000,
    )
    assert len(generations) >= 32 and all(e.lifecycle_stage == "deleted" for e in generations)


def test_killed_holder_is_taken_over_by_exactly_one_breaker(postgres_registry: str, tmp_path: Path):
    uri, held = postgres_registry, tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, uri, str(held)], cwd=REPO, env=project_env())
    _wait_for([held], [holder])
    # Alive: a waiter times out with one line saying who holds it, since when, and how to clear it.
    with pytest.raises(LockHeld) as waited, server_lock(uri, NAME, timeout=0.3, break_after=600):
        pass
    line = str(waited.value)
    assert "\n" not in line and f"pid {holder.pid}" in line and socket.gethostname() in line
    assert "holding since 20" in line and "GENPIPE_LOCK_BREAK_AFTER=0" in line and "--experiment-id" in line
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # Two would-be breakers at once: one breaks (its pid is gone from this host), the other waits for it.
    barrier, spans, breaks, errors = threading.Barrier(2), [], [], []

    def breaker() -> None:
        try:
            barrier.wait()
            with server_lock(uri, NAME, timeout=60, break_after=600, on_break=breaks.append) as lease:
                start = time.monotonic()
                time.sleep(0.5)
                spans.append((start, time.monotonic(), lease.generation))
        except BaseException as err:
            errors.append(repr(err))

    threads = [threading.Thread(target=breaker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(spans) == 2
    (a_start, a_end, a_gen), (b_start, b_end, b_gen) = sorted(spans)
    assert a_end <= b_start and b_gen == a_gen + 1  # never two holders at once
    assert len(breaks) == 1, breaks
    assert f"pid {holder.pid}" in breaks[0] and "is gone from this host" in breaks[0] and "since" in breaks[0]


def test_old_lock_of_another_host_is_broken_after_the_break_age(postgres_registry: str):
    uri, client = postgres_registry, MlflowClient(tracking_uri=postgres_registry)
    with server_lock(uri, NAME) as lease:  # the generation a holder elsewhere would take next
        pass
    tags = {"genpipe.lock.host": "elsewhere", "genpipe.lock.pid": "1", "genpipe.lock.user": "ci"}
    name = f"{_prefix(lock_model_name(NAME))}{lease.generation + 1:012d}"
    client.create_experiment(name, tags=tags)
    with pytest.raises(LockHeld, match="by ci@elsewhere pid 1"), server_lock(uri, NAME, timeout=0.3):
        pass
    with (
        pytest.raises(ValueError, match="break_after must be a number of seconds >= 0"),
        server_lock(uri, NAME, break_after=float("nan")),
    ):
        pass
    time.sleep(1.1)
    breaks = []
    with server_lock(uri, NAME, timeout=5, break_after=1, on_break=breaks.append) as taken:
        assert taken.generation == lease.generation + 2
    assert len(breaks) == 1 and "ci@elsewhere pid 1" in breaks[0] and "over the break age of 1 s" in breaks[0]
    broke = client.get_experiment(taken.experiment_id).tags["genpipe.lock.broke"]
    assert broke.startswith(f"generation {lease.generation + 1}: held for")
    # The command the timeout line gives clears a lock, exactly as written.
    stuck = client.create_experiment(
        f"{_prefix(lock_model_name(NAME))}{taken.generation + 1:012d}", tags=tags
    )
    with pytest.raises(LockHeld) as waited, server_lock(uri, NAME, timeout=0.2):
        pass
    command = str(waited.value).split("`")[1]
    assert command.endswith(f"experiments delete --experiment-id {stuck}")
    subprocess.run(["bash", "-c", command], check=True, capture_output=True, env=project_env())
    with server_lock(uri, NAME, timeout=0.5) as free:  # no waiting, no breaking
        assert free.generation == taken.generation + 2


def test_ten_promote_processes_over_five_rounds(postgres_registry: str, tmp_path: Path):
    """Each round a new evaluated version becomes challenger; 10 processes (forked after one import,
    each running the CLI's own `main`) promote at once. Every one exits 0 with no traceback, the champion is the best
    version so far, and the history holds exactly one decision per round."""
    uri, rounds, n = postgres_registry, 5, 10
    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: {uri}\n")
    env = project_env(PYTHONPATH=str(REPO))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(n), str(rounds)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    ]
    try:
        _wait_for([tmp_path / f"ready-w{i}" for i in range(n)], workers)
        best, figures, started = None, [2.0, 1.5, 1.8, 1.0, 1.2], time.monotonic()
        for r, figure in enumerate(figures):
            version = add_evaluated(uri, tmp_path, fid_over_floor=figure)
            if best is None or figure < best[1]:
                best = (version, figure)
            (tmp_path / f"go-{r}").touch()
            done = [tmp_path / f"done-{r}-w{i}.json" for i in range(n)]
            _wait_for(done, workers)
            results = [json.loads(p.read_text()) for p in done]
            assert all(x["code"] == 0 for x in results), results
            assert not any("Traceback" in x["err"] + x["out"] for x in results), results
            assert all(f"champion is v{best[0]}" in x["out"] for x in results), results
            assert version_by_alias(tracking_uri=uri, name=NAME, alias=CHAMPION) == best[0]
        print(f"10 processes x {rounds} rounds: {time.monotonic() - started:.1f} s after start-up")
        assert workers[0].wait(timeout=60) == 0, workers[0].communicate()
    finally:
        stop_group(workers[0], grace=1)
    decisions = history(uri, NAME)
    assert [e["decision"] for e in decisions] == ["promoted", "promoted", "kept", "promoted", "kept"]
    assert [e["challenger"] for e in decisions] == ["1", "2", "3", "4", "5"]
    report = json.loads((tmp_path / "reports" / "promote.json").read_text())[NAME]
    assert (report["decision"], report["challenger"], report["champion"]) == ("kept", "5", "4")
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".promote.json.tmp")]


def test_real_cli_processes_race_over_postgres(postgres_registry: str, tmp_path: Path):
    uri = postgres_registry
    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: {uri}\n")
    v1 = add_evaluated(uri, tmp_path, fid_over_floor=1.0)
    genpipe = str(Path(sys.executable).parent / "genpipe")
    racers = [
        subprocess.Popen(
            [genpipe, "promote", "diffusion_pixel"],
            cwd=tmp_path,
            env=project_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in racers]
    assert all(code == 0 and f"champion is v{v1}" in out and not err for code, out, err in outs), outs
    assert version_by_alias(tracking_uri=uri, name=NAME, alias=CHAMPION) == v1
    assert [e["decision"] for e in history(uri, NAME)] == ["promoted"]
    assert set(os.listdir(tmp_path / "reports")) == {
        "promote.json",
        ".promote.json.lock",
    }  # no temp file left
