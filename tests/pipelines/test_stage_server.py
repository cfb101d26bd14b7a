"""The stage server `genpipe repro` starts: a stage forked from it behaves as in its own process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.stage_socket import FOLDER_PREFIX, SOCKET_NAME, remove_stale
from pipelines.timing import PROCESS_START_ENV, StageClock
from tests.conftest import REPO, project_env, run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server process on a socket in a temp dir; yields (socket path, its log file)."""
    folder = tmp_path_factory.mktemp("server")
    path, log = folder / "s.sock", folder / "server.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipelines.stage_server", "--socket", str(path)],
            env=project_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout.readline().strip() == "listening"
    yield str(path), log
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert not path.exists(), "the socket outlived the server"


def _pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r": pid (\d+)", log.read_text())]


def test_a_stage_through_the_server_matches_its_own_process(server, repo_copy: Path):
    path, log = server
    before = len(_pids(log))
    direct = run(["genpipe", "prepare", "--dry-run"], repo_copy)
    served = run(["genpipe", "prepare", "--dry-run"], repo_copy, GENPIPE_STAGE_SERVER=path)
    assert served.stdout == direct.stdout and yaml.safe_load(served.stdout)["prepare"]["source"]
    assert len(_pids(log)) == before + 1, "the server did not run it"
    # the client's environment and directory: a params file named relative to the client's cwd
    (repo_copy / "sub").mkdir()
    raw = yaml.safe_load((repo_copy / "params.yaml").read_text())
    raw["prepare"]["image_size"] = 12
    (repo_copy / "sub" / "p.yaml").write_text(yaml.safe_dump(raw))
    out = run(
        ["genpipe", "prepare", "--dry-run", "--params", "p.yaml"],
        repo_copy / "sub",
        GENPIPE_STAGE_SERVER=path,
        GENPIPE_ROOT=str(repo_copy),
    )
    assert yaml.safe_load(out.stdout)["prepare"]["image_size"] == 12
    assert len(_pids(log)) == before + 2


def test_a_failing_stage_fails_the_same_way(server, repo_copy: Path):
    path, log = server
    raw = yaml.safe_load((repo_copy / "params.yaml").read_text())
    raw["prepare"]["image_size"] = 1
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    direct = run(["genpipe", "prepare", "--dry-run"], repo_copy, check=False)
    served = run(["genpipe", "prepare", "--dry-run"], repo_copy, check=False, GENPIPE_STAGE_SERVER=path)
    assert direct.returncode == served.returncode == 1
    assert served.stderr == direct.stderr and len(served.stderr.strip().splitlines()) == 1
    assert "prepare.image_size=1" in served.stderr


def test_a_killed_client_stops_its_stage_and_the_server_goes_on(server, repo_copy: Path):
    path, log = server
    client, child = _start_prepare(repo_copy, path, log)
    client.send_signal(signal.SIGKILL)  # no chance to forward anything: the server must notice
    client.wait(timeout=30)
    deadline = time.time() + 30
    while _alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the stage ran on after its client was killed"
    assert "its client went away" in log.read_text()
    # the server still serves
    assert run(["genpipe", "prepare", "--dry-run"], repo_copy, GENPIPE_STAGE_SERVER=path).returncode == 0


def test_sigterm_to_the_client_reaches_the_stage(server, repo_copy: Path):
    path, log = server
    client, child = _start_prepare(repo_copy, path, log)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 128 + signal.SIGTERM  # the stage's own status, passed back
    assert not _alive(child)


def test_a_bad_or_abandoned_request_leaves_the_server_serving(server, repo_copy: Path):
    path, log = server
    request = {"argv": ["genpipe", "prepare"], "cwd": str(repo_copy), "env": project_env(), "start": 0.0}
    body = json.dumps(request).encode()
    seen = log.read_text()
    null = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    try:
        for head, payload in ((len(b"[1"), b"[1"), (len(body), body)):  # not JSON; a client that hangs up
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(path)
                socket.send_fds(conn, [head.to_bytes(8, "big")], null)
                conn.sendall(payload)
    finally:
        for fd in null:
            os.close(fd)
    assert run(["genpipe", "prepare", "--dry-run"], repo_copy, GENPIPE_STAGE_SERVER=path).returncode == 0
    text = log.read_text()
    for note in ("bad request ignored", "went away"):  # went away: before its fork, or after, stopped
        assert text.count(note) == seen.count(note) + 1, note


def test_without_a_server_the_stage_runs_in_its_own_process(repo_copy: Path, tmp_path: Path):
    missing = str(tmp_path / "none.sock")
    out = run(["genpipe", "prepare", "--dry-run"], repo_copy, GENPIPE_STAGE_SERVER=missing)
    assert yaml.safe_load(out.stdout)["prepare"]["source"] == "builtin:digits"
    off = run(["genpipe", "prepare", "--dry-run"], repo_copy, GENPIPE_STAGE_SERVER="off")
    assert off.stdout == out.stdout


def test_a_forked_stages_clock_counts_from_its_clients_start(monkeypatch):
    """The server hands the client's start over in the fork's environment; the stage's clock takes it
    once (a process the stage starts counts from its own start)."""
    monkeypatch.setenv(PROCESS_START_ENV, repr(123.0))
    clock = StageClock()
    clock.mark("cli")
    assert clock.marks["process"] == 123.0 and clock.phases()["python"] == clock.marks["cli"] - 123.0
    assert PROCESS_START_ENV not in os.environ and StageClock().marks["process"] > 123.0


def test_the_clients_start_time_is_its_own_to_the_tick():
    """/proc/stat's btime is whole seconds: a start built on it reads up to 1 s early."""
    code = (
        "import time; t = time.time(); from pipelines.launch import process_start; print(process_start(), t)"
    )
    before = time.time()
    start, first_line = map(float, run([sys.executable, "-c", code], REPO).stdout.split())
    assert before - 0.02 <= start <= first_line  # a clock tick is 10 ms


def _start_prepare(repo_copy: Path, path: str, log: Path) -> tuple[subprocess.Popen, int]:
    """A real `genpipe prepare` through the server (a few seconds of work); its client and fork pid."""
    before = len(_pids(log))
    client = subprocess.Popen(
        ["genpipe", "prepare"], cwd=repo_copy, env=project_env(GENPIPE_STAGE_SERVER=path), text=True
    )
    deadline = time.time() + 60
    while len(_pids(log)) == before and time.time() < deadline:
        time.sleep(0.1)
    assert len(_pids(log)) > before, "the server never forked the stage"
    return client, _pids(log)[-1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by the server) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("client_stays", [True, False])
def test_waiting_without_a_pidfd(client_stays: bool):
    """The polling wait (kernels before Linux 5.3): the exit status, or a stop when the client goes."""
    from pipelines.stage_server import _wait_polling

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # a stand-in stage: exits 3 after a moment, or is stopped long before its 30 s
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as run_stage does (the test process may trap it)
        ours.close()  # a stage holds no end of its client's connection, as in run_stage
        theirs.close()
        time.sleep(0.3 if client_stays else 30)
        os._exit(3)
    if not client_stays:
        theirs.close()  # the client was killed
    started = time.monotonic()
    code = _wait_polling(pid, ours)
    assert code == (3 if client_stays else 128 + signal.SIGTERM) and time.monotonic() - started < 15
    ours.close()
    if client_stays:
        theirs.close()


PARENT = """
import os, sys, time
from pathlib import Path
from pipelines.repro import start_server
server = start_server(dict(os.environ), log=Path(sys.argv[1]))
print(server.socket, server.process.pid, flush=True)
time.sleep(600)
"""


def test_the_server_dies_with_the_command_that_started_it(tmp_path: Path):
    """`genpipe repro` SIGKILLed with its group: its server stops and removes its socket folder."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)],
        cwd=REPO,
        env=project_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        path, pid = parent.stdout.readline().split()
        assert Path(path).exists() and _alive(int(pid))
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 60  # it may be in its imports: a handler runs at the next bytecode
    while (_alive(int(pid)) or Path(path).parent.exists()) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(int(pid)), "the stage server outlived the command that started it"
    assert not Path(path).parent.exists(), "its socket folder was left behind"


def test_a_server_whose_parent_is_already_gone_stops_at_once(tmp_path: Path):
    folder = tmp_path / f"{FOLDER_PREFIX}x"
    folder.mkdir()
    out = subprocess.run(  # its parent is this test, not pid 1: as if the real one died before prctl
        [sys.executable, "-P", "-m", "pipelines.stage_server", "--socket", str(folder / SOCKET_NAME)]
        + ["--parent", "1"],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "listening" not in out.stdout and "is gone" in out.stderr
    assert not folder.exists()


def test_stale_socket_folders_are_removed_live_ones_kept(server, tmp_path: Path):
    live_path, _ = server
    dead, fresh, other = (tmp_path / f"{FOLDER_PREFIX}{name}" for name in ("dead", "fresh", "x"))
    for folder in (dead, fresh):
        folder.mkdir()
    for folder in (dead, fresh):  # a SIGKILLed server: its socket file, nobody listening
        with socket.socket(socket.AF_UNIX) as gone:
            gone.bind(str(folder / SOCKET_NAME))
    os.utime(dead / SOCKET_NAME, (time.time() - 120,) * 2, follow_symlinks=False)  # fresh: now binding
    live = tmp_path / f"{FOLDER_PREFIX}live"
    live.mkdir()
    (live / SOCKET_NAME).symlink_to(live_path)  # the module's running server
    other.mkdir()
    (other / "note").write_text("no socket, but recent: a server before its bind()")
    assert remove_stale(str(tmp_path)) == [dead]
    assert fresh.exists() and live.exists() and other.exists()
