"""`genpipe repro`: `dvc repro` with one local Ray instance that every stage joins, then a summary.

Each stage is its own process (DVC runs them), so a bare `dvc repro` starts and stops a local Ray
instance per training stage: ~4 s each on a 2-core laptop. Here the instance is started once,
in this process, and handed to the stages through RAY_ADDRESS in their environment only: nothing
outside this command sees it, and it stops with this command. Where the user already names a
cluster (RAY_ADDRESS, or `ray.address` in params), the stages join that one as they always do.

The stages also skip their imports: a stage server (pipelines/stage_server.py) imports torch, Ray,
MLflow and the stage modules once, and each `genpipe <stage>` that DVC starts runs in a fork of it
(GENPIPE_STAGE_SERVER=off in the environment turns this off; a stage whose server is gone runs in its
own process as before).

At the end: one table of every stage that ran (wall time, training time, overhead, headline
figures), printed and written to .genpipe/last_repro.md.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.stage_socket import FOLDER_PREFIX, SERVER_ENV, SOCKET_NAME, remove_stale

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
#: `dvc exp run --run-all` says this of a failed experiment and still exits 0
FAILED_EXPERIMENTS = re.compile(r"^ERROR: Failed to reproduce experiment\(s\)")
TIMING_LINE = re.compile(r"^(\S+): [\d.]+ s = training ([\d.]+) \+ overhead ([\d.]+) s")


@dataclass
class StageTime:
    name: str
    started: float
    ended: float | None = None
    training: float | None = None
    overhead: float | None = None

    @property
    def wall(self) -> float:
        return (self.ended or time.time()) - self.started


#: dvc arguments under which no stage runs now: no Ray instance or stage server to start for them
NOTHING_RUNS = frozenset({"--dry", "--queue", "-h", "--help"})
#: `dvc exp run --run-all [-j N]`: the queued experiments run now, N at a time, each in DVC's temporary
#: copy: they share the one Ray instance (Ray schedules their workers), but not the stage server,
#: which serves one stage at a time; their interleaved logs make no per-stage summary.
SWEEP = "--run-all"


def main(
    *, params: Path, args: list[str], command: tuple[str, ...] = ("repro",), dry_run: bool = False
) -> int:
    """Run `dvc COMMAND ARGS` against one shared local Ray instance; the summary; dvc's exit status.

    The stages' `genpipe` is this one: its bin folder goes first on their PATH, so a venv needs no
    activating (`.venv/bin/genpipe repro` works where a bare `.venv/bin/dvc repro` finds no `genpipe`).
    `dry_run`: the stages DVC would run and each training stage's estimate instead (pipelines/plan.py).
    """
    dvc = [dvc_executable(), *command, *args]
    if dry_run:
        from pipelines.plan import main as plan

        return plan(params=params, dvc=dvc, env=_stage_env())
    if NOTHING_RUNS & set(args):  # a dry run, or queued experiments that run later, elsewhere
        return subprocess.run(dvc, env=_stage_env()).returncode
    import ray

    from components.config import load_stage
    from pipelines.lineage import repo_root
    from pipelines.ray_start import SHARED_LOCAL_ENV, init_ray, joins_cluster

    ray_cfg = load_stage(params, "prepare")["ray"]
    shared = None
    if joins_cluster(ray_cfg) is None:
        init_ray(ray_cfg)  # sets RAY_AUTH_MODE here; the stages inherit it with the address
        shared = ray.get_runtime_context().gcs_address
    env = _stage_env()
    if shared is not None:
        env["RAY_ADDRESS"] = env[SHARED_LOCAL_ENV] = address = shared
        print(f"genpipe repro: stages share the local Ray instance at {address}", flush=True)
    # Linux only: forking a process that imported torch is not safe on macOS (Objective-C runtime)
    off = os.environ.get(SERVER_ENV) == "off" or sys.platform != "linux" or SWEEP in args
    server = None if off else start_server(env, log=repo_root() / ".genpipe")
    if server is not None:
        env[SERVER_ENV] = server.socket
    try:
        stages, rc = _run_dvc(dvc, env=env)
    finally:
        if server is not None:
            server.stop()
        if ray.is_initialized():
            ray.shutdown()
    if stages and SWEEP not in args:
        table = summary(stages, root=repo_root())
        print(table)
        out = repo_root() / ".genpipe" / "last_repro.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    return rc


def dvc_executable() -> str:
    """The dvc beside this interpreter (the venv's), else the first on PATH (DVC on PYTHONPATH, a shim)."""
    beside = Path(sys.executable).parent / "dvc"
    if beside.is_file():
        return str(beside)
    if found := shutil.which("dvc"):
        return found
    raise FileNotFoundError(f"no dvc beside {sys.executable} or on PATH: install DVC (pip install dvc)")


def _stage_env() -> dict[str, str]:
    """This environment, this venv's bin folder first on PATH (what activating the venv does)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class StageServer:
    process: subprocess.Popen
    socket: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(Path(self.socket).parent, ignore_errors=True)


def start_server(env: dict[str, str], *, log: Path) -> StageServer | None:
    """The stage server, listening (it imports in the background); None, with a note, if it fails."""

    for stale in remove_stale(tempfile.gettempdir()):
        print(f"genpipe repro: removed {stale}, left by a stage server that was killed", flush=True)
    folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)
    path = os.path.join(folder, SOCKET_NAME)
    log.mkdir(parents=True, exist_ok=True)
    with open(log / "stage_server.log", "w") as err:
        process = subprocess.Popen(  # -P: not the working directory's copy, the code `genpipe` runs
            [
                sys.executable,
                "-P",
                "-m",
                "pipelines.stage_server",
                "--socket",
                path,
                "--parent",
                str(os.getpid()),
            ],
            env={k: v for k, v in env.items() if k != SERVER_ENV},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # Ctrl-C reaches a stage once, through its client
        )
    assert process.stdout is not None
    if select.select([process.stdout], [], [], 60)[0] and process.stdout.readline().strip() == "listening":
        process.stdout.close()
        return StageServer(process, path)
    process.kill()
    process.wait()
    shutil.rmtree(folder, ignore_errors=True)
    print(
        f"genpipe repro: the stage server did not start (see {log / 'stage_server.log'}); "
        "each stage starts its own process",
        flush=True,
    )
    return None


def _run_dvc(cmd: list[str], *, env: dict[str, str]) -> tuple[list[StageTime], int]:
    """Stream dvc's output through, timing each `Running stage` and reading each stage's timing line."""
    stages: list[StageTime] = []
    failed = False
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    try:
        for line in _lines_while_running(proc):
            sys.stdout.write(line)
            sys.stdout.flush()
            now = time.time()
            failed = failed or bool(FAILED_EXPERIMENTS.match(line))
            if m := STAGE_LINE.match(line):
                if stages and stages[-1].ended is None:
                    stages[-1].ended = now
                stages.append(StageTime(m.group(1), now))
            elif (m := TIMING_LINE.match(line)) and stages:
                stages[-1].training, stages[-1].overhead = float(m.group(2)), float(m.group(3))
    except KeyboardInterrupt:
        proc.terminate()
        raise
    rc = proc.wait()
    if stages and stages[-1].ended is None:
        stages[-1].ended = time.time()
    return stages, rc or int(failed)


def _lines_while_running(proc: subprocess.Popen, *, grace_s: float = 2.0):
    """`proc`'s output lines until it has exited and its pipe has been quiet for `grace_s`.

    Not until EOF: `dvc exp run --run-all` starts queue workers that inherit its stdout and may
    outlive it (a celery worker idled for minutes after the queue was done), so EOF can come long
    after dvc itself has finished."""
    buffered, decode = "", codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    fd = proc.stdout.fileno()
    quiet_since = None
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # EOF
            buffered += decode(chunk)
            *lines, buffered = buffered.split("\n")
            yield from (line + "\n" for line in lines)
            quiet_since = None
        elif proc.poll() is not None:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= grace_s:
                break
    if buffered:
        yield buffered


#: stage name prefix -> (report file relative to reports/, {key: format}) for the headline column
HEADLINES = {
    "prepare": ("prepare.json", {"num_train": "{:.0f} train images"}),
    "train_evaluator": ("train_evaluator.json", {"test_accuracy": "test acc {:.1%}"}),
    "train_tokenizer": (
        "train_tokenizer.json",
        {"psnr": "PSNR {:.1f} dB", "rfid_over_floor": "rFID {:.2f}x floor", "codebook_usage": "usage {:.0%}"},
    ),
    "evaluate": (
        "evaluate/{item}.json",
        {
            "fid_over_floor": "FD {:.2f}x floor",
            "cond_accuracy": "cond. acc {:.1%}",
            "bits_per_dim": "{:.2f} bits/dim",
        },
    ),
}


def headline(stage: str, root: Path) -> str:
    """The stage's figures worth a glance (its report's), '' when it has none yet."""
    from components import catalog

    base, _, item = stage.partition("@")
    if base in HEADLINES:
        name, keys = HEADLINES[base]
        path = root / "reports" / name.format(item=item)
    elif item:  # a generator's training stage: its validation figures
        try:
            model = catalog.trained_by(base, item)
        except ValueError:
            return ""
        path = root / "reports" / f"train_{model.name}.json"
        keys = {"val/loss": "val loss {:.4g}", "val/bpd": "val {:.3f} bits/dim"}
    else:
        return ""
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    return ", ".join(
        fmt.format(figures[k]) for k, fmt in keys.items() if isinstance(figures.get(k), (int, float))
    )


def summary(stages: list[StageTime], *, root: Path) -> str:
    """A Markdown table: stage, wall, training, overhead, headline figures; the total last."""
    rows = ["| stage | wall s | training s | overhead s | headline |", "|---|---:|---:|---:|---|"]

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.1f}"

    for s in stages:
        rows.append(
            f"| {s.name} | {s.wall:.1f} | {fmt(s.training)} | {fmt(s.overhead)} | {headline(s.name, root)} |"
        )
    total = sum(s.wall for s in stages)
    rows.append(f"| **total** | **{total:.1f}** | | | {len(stages)} stages |")
    return "\n".join(rows)
