"""Every command README.md shows, as written, from a fresh clone whose shell has no venv on its PATH.

A README line that starts with `.venv/bin/` or `make` (after any `VAR=value` prefix) is a command a
user pastes. Each runs through bash in a clone of this repository (its `.venv` links this one),
with `.venv/bin` removed from PATH: for real where that takes seconds, else in a form that parses
every argument without the long work (`--help`, `--dry`, one stage instead of the pipeline).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

REAL = ""  # run the line exactly as written
EXPERIMENT = ".venv/bin/genpipe exp run -S prepare."
#: README command (its first words) -> what this test runs instead, {line} being the line as written
FORMS = {
    "make run": "make -n run",  # -n: print what it would run (each step is checked to exist)
    "make test": "make -n test",
    ".venv/bin/genpipe --help": REAL,
    ".venv/bin/genpipe prepare --dry-run": REAL,
    ".venv/bin/genpipe repro": "{line} --dry",  # dvc repro --dry: every stage it would run, none run
    EXPERIMENT: "{line} prepare",  # a real experiment, its first stage only
    ".venv/bin/genpipe exp run -S train.num_workers=2": "{line} --queue",  # queued: needs the cluster
    ".venv/bin/genpipe sample": REAL,  # a fresh clone has no registry: one line naming the model
    ".venv/bin/genpipe models": REAL,
    ".venv/bin/genpipe serve": REAL,  # a fresh clone has no registry: one line naming the model
    ".venv/bin/mlflow ui": "{line} --help",  # a server; --help still rejects an unknown option
    ".venv/bin/pip install": "{line} --help",  # the network
    ".venv/bin/dvc remote add": REAL,
    ".venv/bin/dvc push": "{line} --help",  # after `remote add` above: an S3 bucket
}
#: expected exit status where it is not 0, and a pattern its output must match
FAILS = {
    ".venv/bin/genpipe sample": (1, r"genpipe-diffusion"),
    ".venv/bin/genpipe serve": (1, r"genpipe-diffusion"),
}
USAGE = re.compile(r"command not found|No such (option|command)|unrecognized arguments|Usage: .*Error", re.S)


def readme_commands() -> list[str]:
    """Lines of README.md's code blocks that start (after VAR=value words) with .venv/bin/ or make."""
    lines, block, pending = [], False, ""
    for raw in (REPO / "README.md").read_text().splitlines():
        if raw.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        line = pending + raw.strip()
        if line.split("#")[0].rstrip().endswith("\\"):  # a continued command
            pending = line.split("#")[0].rstrip()[:-1] + " "
            continue
        pending = ""
        words = [w for w in line.split() if not re.match(r"^[A-Z_]+=", w)]
        if words and (words[0].startswith(".venv/bin/") or words[0] == "make"):
            lines.append(re.sub(r"\s+#\s.*$|\s*&$", "", line))  # no comment, in the foreground
    return lines


def form(line: str) -> str:
    matches = [key for key in FORMS if line.startswith(key)]
    assert matches, f"README command with no entry in FORMS: {line!r}"
    return FORMS[max(matches, key=len)]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """This repository's committed files as a fresh clone, .venv linked to this one."""
    dst = tmp_path_factory.mktemp("readme") / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dst)], check=True)
    for rel in ("README.md", "Makefile", "dvc.yaml", "params.yaml"):  # as in this working tree
        (dst / rel).write_bytes((REPO / rel).read_bytes())
    (dst / ".venv").symlink_to(BIN.parent)
    return dst


def bare_env() -> dict[str, str]:
    """The user's environment, with no venv activated: no directory on PATH holds genpipe or dvc."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS", "GENPIPE_ROOT")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("GENPIPE_STAGE_SERVER", None)
    keep = [d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "genpipe").exists()]
    env["PATH"] = os.pathsep.join(keep or ["/usr/bin", "/bin"])
    return env


def test_readme_lists_the_commands_this_test_runs():
    commands = readme_commands()
    assert any("genpipe repro" in c for c in commands) and any("exp run" in c for c in commands)
    assert not [c for c in commands if c.startswith(".venv/bin/dvc ") and c.split()[1] in ("repro", "exp")], (
        "README runs stages through .venv/bin/dvc: its stages' `genpipe` is not on PATH"
    )
    for line in commands:
        form(line)


def _bash(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=bare_env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def experiment(clone: Path) -> subprocess.CompletedProcess:
    """README's experiment, run for real on its first stage: the data a `--dry` form needs (DVC fails
    a dry run on a stage whose inputs are missing)."""
    (line,) = [c for c in readme_commands() if c.startswith(EXPERIMENT)]
    return _bash(FORMS[EXPERIMENT].format(line=line), clone)


@pytest.mark.parametrize("line", readme_commands())
def test_a_readme_command_works_as_written(line: str, clone: Path, request):
    command = form(line).format(line=line) or line
    if line.startswith(EXPERIMENT):
        proc = request.getfixturevalue("experiment")
    else:
        if command.endswith("--dry"):
            request.getfixturevalue("experiment")
        proc = _bash(command, clone)
    out = proc.stdout + proc.stderr
    key = max((k for k in FORMS if line.startswith(k)), key=len)
    code, pattern = FAILS.get(key, (0, ""))
    assert proc.returncode == code and not USAGE.search(out), (
        f"{command}: exit {proc.returncode}\n{out[-3000:]}"
    )
    assert re.search(pattern, out), out[-3000:]
    if line.startswith("make"):  # every step it would run is there to run
        for step in proc.stdout.splitlines():
            exe = step.split()[0] if step.strip() else ""
            if exe.startswith("/") or exe.startswith(".venv/"):
                assert (clone / exe).exists() or Path(exe).exists(), f"{line}: {exe} is missing"
