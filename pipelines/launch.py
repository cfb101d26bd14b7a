"""The `genpipe` command's entry point: a stage runs in `genpipe repro`'s stage server when one is up.

Standard library only at module level: a stage handed to the server (pipelines/stage_server.py)
starts in ~0.1 s instead of importing torch, Ray and MLflow for ~4 s. Anything else, and every
command when GENPIPE_STAGE_SERVER is unset, "off" or unreachable, runs as before, in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from components import catalog
from pipelines.stage_socket import SERVER_ENV

FORK_TIMEOUT_S = 120.0  # a free server forks within its imports' time (~5 s); else run here
STAGES = frozenset(stage.name for stage in catalog.STAGES)  # what a stage server may run


def main() -> None:
    address = os.environ.get(SERVER_ENV, "off")
    args = sys.argv[1:]
    if address != "off" and args and args[0] in STAGES and not {"--help", "-h"} & set(args):
        code = through_server(address)
        if code is not None:
            sys.exit(code)
    from pipelines.cli import app

    app()


def process_start() -> float:
    """This process's start (epoch seconds) from /proc, so the stage's timing line counts from it."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        # its age on the boot clock, not /proc/stat's btime: whole seconds, up to 1 s early
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def through_server(address: str) -> int | None:
    """Run this command in a fork of the server; its exit status, or None if the server never took it."""
    request = json.dumps(
        {
            "argv": ["genpipe", *sys.argv[1:]],
            "cwd": os.getcwd(),
            "env": {k: v for k, v in os.environ.items() if k != SERVER_ENV},
            "start": process_start(),
        }
    ).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address)
        socket.send_fds(conn, [len(request).to_bytes(8, "big")], [0, 1, 2])
        conn.sendall(request)
        replies = conn.makefile("r")
        conn.settimeout(FORK_TIMEOUT_S)  # a server stuck in its imports: run here rather than hang
        first = json.loads(replies.readline() or "{}")
        conn.settimeout(None)  # the stage itself may run for hours
    except (OSError, ValueError):
        conn.close()  # a server that forks later sees the hang-up and runs nothing
        return None  # no server, or it stopped before forking: nothing ran, run here
    pid = first.get("pid") if isinstance(first, dict) else None
    if not isinstance(pid, int):
        conn.close()
        return None  # the server declined (see stage_server.serve_one): run here

    def forward(signum, _frame) -> None:  # Ctrl-C, or DVC stopping the stage: the stage gets it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        last = json.loads(replies.readline() or "{}")
    except (OSError, ValueError):
        last = {}
    if not isinstance(last.get("exit"), int):
        print("genpipe: error: the stage server stopped before the stage finished", file=sys.stderr)
        return 1
    return last["exit"]


if __name__ == "__main__":
    main()
