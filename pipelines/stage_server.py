"""`genpipe repro`'s stage server: each stage runs in a fork of one process that imported its code.

DVC starts every stage as its own `genpipe <stage>` process, and each spent ~4 s of its start-up
importing torch, Ray, MLflow and the stage's modules (the `python` and `imports` phases of its timing
line). This server imports them once. pipelines/launch.py hands it a stage's argv, working
directory, environment and stdin/stdout/stderr (over a Unix socket, the descriptors as SCM_RIGHTS);
the stage runs in a fork exactly as it would in its own process, and its exit status goes back to
the waiting `genpipe` process, which forwards Ctrl-C and SIGTERM to the fork. A fork shares nothing
but imported modules: the server never starts Ray, opens an MLflow store or runs a torch op, and
forks only while it has a single thread. One stage at a time, as DVC runs them.

`genpipe repro` starts it (GENPIPE_STAGE_SERVER=off: it does not) and stops it when DVC is done.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from components import catalog
from pipelines.stage_socket import FOLDER_PREFIX

PRELOAD = (
    "torch",
    "numpy",
    "pyarrow.parquet",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "ray",
    "ray.data",
    "ray.train",
    "ray.train.torch",
    "pipelines.cli",
    "pipelines.training",
    *(stage.module for stage in catalog.STAGES),
)
GRACE_S = 10.0  # a stage whose client died gets SIGTERM, then SIGKILL after this long
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} stage server: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stage_server", description=__doc__)
    parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    parser.add_argument("--parent", type=int, help="pid whose death stops this server (Linux)")
    args = parser.parse_args(argv)
    path = args.socket
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stage through its client
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # outside the try: a path already taken is another server's to remove
    try:
        listener.listen(16)  # clients that connect during the imports below wait in the backlog
        if args.parent is not None:
            die_with(args.parent)
        print("listening", flush=True)
        started = time.perf_counter()
        for name in PRELOAD:
            importlib.import_module(name)
        log(f"imported {len(PRELOAD)} modules in {time.perf_counter() - started:.1f} s")
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    serve_one(conn, listener)
                except Exception as err:  # noqa: BLE001 - one client's trouble never stops the server
                    log(f"request failed: {err!r}")
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)
        if Path(path).parent.name.startswith(FOLDER_PREFIX):
            with contextlib.suppress(OSError):
                Path(path).parent.rmdir()


def _terminate(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut the cleanup short
    sys.exit(0)


def die_with(parent: int) -> None:
    """SIGTERM this server when `parent` dies, however it dies (even SIGKILL): prctl(PR_SET_PDEATHSIG).

    The signal comes when the thread that started this process ends: genpipe repro's main thread.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the prctl: no signal will come
        log(f"pid {parent}, which started this server, is gone: stopping")
        sys.exit(0)


def serve_one(conn: socket.socket, listener: socket.socket) -> None:
    """Fork the stage one client asks for, wait for it, send its exit status back."""
    fds: list[int] = []
    try:
        head, fds, _, _ = socket.recv_fds(conn, 8, 3)
        if not head and not fds:  # a connect-and-close: remove_stale probing whether this one lives
            return
        request = json.loads(_read(conn, int.from_bytes(head, "big")))
        argv, cwd, env, start = request["argv"], request["cwd"], request["env"], float(request["start"])
        strings = (
            [*argv, cwd, *env, *env.values()] if isinstance(argv, list) and isinstance(env, dict) else []
        )
        if not strings or not all(isinstance(s, str) for s in strings):
            raise TypeError("argv, cwd, env must be a list of strings, a string, a dict of strings")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log(f"bad request ignored: {err!r}")
        _close(fds)
        return
    if select.select([conn], [], [], 0)[0]:  # it hung up (timed out waiting, killed): nothing to run
        log(f"{' '.join(argv[1:])}: its client went away before it started")
        _close(fds)
        return
    # Python threads only: the native ones here (numpy's and scipy's OpenBLAS pools, Arrow's jemalloc
    # background thread) park themselves around a fork through their pthread_atfork handlers.
    if len(fds) != 3 or threading.active_count() != 1:
        log(f"declined ({len(fds)} descriptors, {threading.active_count()} threads): the client runs it")
        _close(fds)
        conn.sendall(b'{"pid": null}\n')
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        run_stage(argv, cwd=cwd, env=env, start=start, fds=fds, inherited=(listener, conn))
    _close(fds)
    log(f"{' '.join(argv[1:])}: pid {pid}")
    try:
        with contextlib.suppress(OSError):  # a client already gone: wait() sees it and stops the fork
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        code = wait(pid, conn)
    except BaseException:  # the server stops (SIGTERM) while the stage runs: the stage stops too
        _stop(pid)
        raise
    log(f"{' '.join(argv[1:])}: exit {code}")
    with contextlib.suppress(OSError):  # a client killed meanwhile
        conn.sendall(json.dumps({"exit": code}).encode() + b"\n")


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 16))
        if not chunk:
            raise ValueError(f"request cut short: {size - left} of {size} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def wait(pid: int, conn: socket.socket) -> int:
    """The fork's exit status (128 + signal when killed); if its client hangs up first, stop it."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # a kernel before Linux 5.3: poll instead
        return _wait_polling(pid, conn)
    try:
        ready, _, _ = select.select([pidfd, conn], [], [])
        if pidfd not in ready:  # the client was killed: a stage must not run on without it
            log(f"pid {pid}: its client went away, stopping it")
            _stop(pid, pidfd)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    return _exit_code(status)


def _wait_polling(pid: int, conn: socket.socket) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _exit_code(status)
        if select.select([conn], [], [], 0.2)[0]:
            log(f"pid {pid}: its client went away, stopping it")
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return _exit_code(status)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            return _exit_code(os.waitpid(pid, 0)[1])


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _stop(pid: int, pidfd: int | None = None) -> None:
    """SIGTERM, then SIGKILL if it still runs after GRACE_S (at once where no pidfd can tell)."""
    own = None
    if pidfd is None:
        with contextlib.suppress(OSError):
            pidfd = own = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        if pidfd is None or not select.select([pidfd], [], [], GRACE_S)[0]:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        if own is not None:
            os.close(own)


def run_stage(
    argv: list[str], *, cwd: str, env: dict[str, str], start: float, fds: list[int], inherited=()
) -> None:
    """In the fork: become the client's process (descriptors, environment, directory), run, exit."""
    code = 1
    try:
        for sock in inherited:  # the server's listener and connection are not the stage's
            sock.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        _stdio()
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = list(argv)
        _reseed()
        from pipelines.cli import app
        from pipelines.timing import PROCESS_START_ENV

        os.environ[PROCESS_START_ENV] = repr(start)  # the stage's clock counts from its client's start
        app(args=argv[1:], prog_name="genpipe")
        code = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - what the interpreter would print, then its status
        traceback.print_exc()
    finally:
        try:
            _flush()
            atexit._run_exitfuncs()  # Ray's shutdown and the like, as at a normal exit
            _flush()
        finally:
            os._exit(code)


def _stdio() -> None:
    """New text streams on the client's 0/1/2, line-buffered so a stage's lines reach DVC as printed.

    The server's own sys.__stdout__ and friends stay (anything that kept one writes to the same fds).
    """
    encoding = sys.stdout.encoding  # the server runs with the stages' environment, hence locale
    sys.stdin = open(0, encoding=encoding, closefd=False)  # noqa: SIM115 - lives as long as the fork
    sys.stdout = open(1, "w", buffering=1, encoding=encoding, errors=sys.stdout.errors, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False)  # noqa: SIM115


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


def _reseed() -> None:
    """A new process draws fresh seeds for the global generators; a fork would repeat its parent's."""
    import random

    import numpy as np

    random.seed()
    np.random.seed()


if __name__ == "__main__":
    main()
