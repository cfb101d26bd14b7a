"""Real services for tests: a PostgreSQL server, an `mlflow server` over HTTP, headless Chromium.

Each starts as its own process group on a free local port and is always stopped (the whole group)
when its context exits. A missing binary skips the test with the command that installs it, except
under CI (`CI=true`), where it fails: `.ci/run` installs them, so missing there is a broken setup.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

PG_INSTALL = "apt-get install -y postgresql"
CHROMIUM_INSTALL = "apt-get install -y chromium-headless-shell"
START_TIMEOUT = 180.0  # a loaded 2-core machine can take over a minute to import and start mlflow


def unavailable(reason: str) -> None:
    """Skip the test, or fail it under CI, where every service must be installed."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run should have installed it)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on the loopback address that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, *, grace: float) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with suppress(ProcessLookupError):  # children left behind (e.g. uvicorn's workers) go too
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait(ready, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} during start-up:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {START_TIMEOUT:g} s:\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.is_file() else "(no log)"


# --- PostgreSQL -------------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    """The folder holding `initdb`, `postgres`: on PATH, else Debian's newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent  # /usr/local/bin/initdb may link into Debian's folder
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on a free port; yields its `postgresql://` URI.

    `initdb` refuses to run as root, so as root the server runs as the `postgres` user, in a folder
    it owns under /tmp (a pytest tmp_path is private to root, so it could not enter it).
    """
    bin_dir = postgres_bin()
    if bin_dir is None or not (bin_dir / "postgres").exists():
        unavailable(f"PostgreSQL binaries (initdb, postgres) not found: install them with `{PG_INSTALL}`")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            unavailable(f"running as root and there is no `postgres` user for initdb: `{PG_INSTALL}` adds it")
    home = Path(tempfile.mkdtemp(prefix="genpipe-pg-"))
    try:
        if user is not None:
            os.chown(home, user.pw_uid, user.pw_gid)
        as_owner = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        log, port = home / "postgres.log", free_port()
        subprocess.run(
            [
                bin_dir / "initdb",
                "-D",
                home / "data",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            cwd=home,
            check=True,
            capture_output=True,
            **as_owner,
        )
        # fsync and friends off: a test database that dies with the test needs no durability.
        settings = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(home), "fsync": "off"}
        settings |= {"synchronous_commit": "off", "full_page_writes": "off"}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [bin_dir / "postgres", "-D", home / "data", "-p", str(port)]
                + [arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")],
                cwd=home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_owner,
            )
        try:
            _wait(lambda: "ready to accept connections" in log.read_text(), proc, log, "postgres")
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            stop_group(proc, grace=10)  # SIGTERM: a "smart" shutdown once its clients are gone
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- mlflow server ----------------------------------------------------------------------------
@contextmanager
def mlflow_server(
    backend_uri: str,
    folder: Path,
    *,
    command: str = "server",
    artifacts: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`mlflow server` (or `mlflow ui`) over `backend_uri` on a free port, artefacts under `folder`
    (or at `artifacts`, e.g. s3://bucket/prefix with `extra_env` naming its endpoint); yields its URL.

    One worker and no job runner: shutdown then takes ~2 s instead of ~13 s.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / f"mlflow-{command}.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", command, "--host", "127.0.0.1", "--port", str(port)]
            + [
                "--backend-store-uri",
                backend_uri,
                "--artifacts-destination",
                artifacts or str(folder / "artifacts"),
            ]
            + ["--workers", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _answers(f"{url}/health"), proc, log, f"mlflow {command}")
        yield url
    finally:
        stop_group(proc, grace=5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_mlflow(tmp_path_factory) -> Iterator[str]:
    """One `mlflow server` over a real PostgreSQL for the whole session (starting both takes ~10-30 s)."""
    with postgres_server() as db, mlflow_server(db, tmp_path_factory.mktemp("postgres-mlflow")) as url:
        yield url


@pytest.fixture
def postgres_registry(postgres_mlflow: str) -> str:
    """The session's PostgreSQL-backed server with an empty registry (runs of earlier tests stay)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=postgres_mlflow)
    for model in client.search_registered_models(max_results=1000):
        client.delete_registered_model(model.name)  # a hard delete: version numbers restart at 1
    return postgres_mlflow


# --- headless Chromium ------------------------------------------------------------------------
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # as root; the page is our own local server
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these, Chromium's own background connections are refused by a closed network and
    # it stalls before rendering.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str:
    """Debian's `chromium-headless-shell`, else a full `chromium`."""
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    unavailable(f"no headless Chromium found: install it with `{CHROMIUM_INSTALL}`")
    raise AssertionError("unreachable")


def browse(
    url: str,
    folder: Path,
    *,
    screenshot: Path | None = None,
    budget_ms: int = 15000,
    window: str = "1400,900",
) -> str:
    """Load `url` in headless Chromium, let its scripts run `budget_ms` of virtual time; the DOM as HTML
    (and a PNG of the `window` (width,height) at `screenshot`)."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=folder))
    out = ["--dump-dom"] + ([f"--screenshot={screenshot}", f"--window-size={window}"] if screenshot else [])
    proc = subprocess.Popen(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
        + [*out, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        dom, err = proc.communicate(timeout=120)
    finally:
        stop_group(proc, grace=2)  # its zygote and GPU helpers share the group
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode} on {url}:\n{err[-2000:]}")
    return dom
