"""Where `genpipe repro`'s stage server listens: the variable that hands its socket to the stages, the
folder it lives in, and the clean-up of folders whose server was SIGKILLed.

Standard library only, imported by the launcher (pipelines/launch.py, before it decides whether to
import anything heavy), by `genpipe repro` (pipelines/repro.py) and by the server itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

SERVER_ENV = "GENPIPE_STAGE_SERVER"  # the Unix socket `genpipe repro` hands to the stages it runs
FOLDER_PREFIX, SOCKET_NAME = "genpipe-stages-", "stages.sock"  # the server removes a folder so named
STALE_S = 3600.0  # a socket folder with no socket in it this long is a server that never bound
BIND_S = 60.0  # a socket nobody listens on is stale once it is this old (bind to listen takes less)


def remove_stale(root: str) -> list[Path]:
    """This user's socket folders under `root` that no server listens on (one was SIGKILLed): removed."""
    removed = []
    for folder in Path(root).glob(f"{FOLDER_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.setblocking(False)  # a live server with a full backlog: EAGAIN, not a wait
                try:
                    probe.connect(str(folder / SOCKET_NAME))
                except FileNotFoundError:  # a server still binding, or one that never did
                    if time.time() - folder.stat().st_mtime < STALE_S:
                        continue
                except ConnectionRefusedError:  # the socket file, nobody listening: its server died
                    if time.time() - (folder / SOCKET_NAME).lstat().st_mtime < BIND_S:
                        continue  # or it is between bind() and listen(): a server starting now
                else:
                    continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
