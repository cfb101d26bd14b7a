"""scripts/gpu-stages.sh, what a session lent a GPU machine runs there: smoke-run here with --cpu.

There it runs a copy of the project (no git repository) with an interpreter that has no `genpipe`
or `dvc` command, the copy's code on PYTHONPATH; these tests run it the same way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import copy_repo, project_env

SCRIPT = Path("scripts", "gpu-stages.sh")


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    """An interpreter with this venv's packages but no `genpipe` or `dvc` command: what the GPU machine has."""
    env_dir = tmp_path_factory.mktemp("bare_env")
    (env_dir / "bin").mkdir()
    (env_dir / "bin" / "python").symlink_to(sys.executable)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", env_dir / "pyvenv.cfg")
    (env_dir / "lib").symlink_to(Path(sys.prefix) / "lib")
    return env_dir / "bin" / "python"


def gpu_stages(
    repo: Path, *args: str, python: Path, out: Path, cmd: str = "run"
) -> subprocess.CompletedProcess:
    env = project_env(PYTHON=str(python), OUT=str(out), PATH="/usr/bin:/bin")
    return subprocess.run(
        ["bash", str(SCRIPT), cmd, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("gpu_stages") / "repo")


def test_repro_runs_the_dag_through_dvc_and_run_runs_stages_in_order(tmp_path_factory, tmp_path, python):
    # A copied tree, no git repository: what the device tool sends. `repro` makes the repository DVC needs.
    repo = copy_repo(tmp_path_factory.mktemp("gpu_stages_repro") / "repo")
    shutil.rmtree(repo / ".git")
    out = tmp_path / "out"
    proc = gpu_stages(
        repo,
        "--cpu",
        "--set", "train_evaluator.loop.steps=30",
        "--set", "train_evaluator.loop.warmup_steps=5",
        "--set", "train_evaluator.loop.checkpoint_every=30",
        "train_evaluator",
        python=python,
        out=out,
        cmd="repro",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DVC ran the target's upstream first, in one Ray instance the stages shared
    assert proc.stdout.index("Running stage 'prepare'") < proc.stdout.index("Running stage 'train_evaluator'")
    assert "stages share the local Ray instance" in proc.stdout
    params = (repo / "params.yaml").read_text()
    assert "steps: 30" in params and "use_gpu: false" in params  # --cpu: no GPU asked for
    assert not (repo / "presets" / "gpu-stages-sets.yaml").exists()
    assert "train_evaluator" in (repo / "dvc.lock").read_text()
    perf = {tuple(line.split("\t")[:2]): float(line.split("\t")[2]) for line in (out / "perf.tsv").open()}
    assert 0 <= perf[("train_evaluator", "final/test_accuracy")] <= 1
    assert perf[("train_evaluator", "perf/samples_per_s")] > 0
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"models/evaluator/config.json", "reports/train_evaluator.json", ".genpipe/last_repro.md"} <= names
    # `run`: stage commands in the order given, each in its own process, no DVC
    proc = gpu_stages(repo, "--cpu", "prepare", "evaluate --help", python=python, out=tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.index("== prepare") < proc.stdout.index("== evaluate --help")
    assert "prepare: 1259 train" in (tmp_path / "run" / "log.txt").read_text()


def test_bad_input_is_one_line_and_changes_nothing(repo, tmp_path, python):
    before = (repo / "params.yaml").read_text()
    cases = {
        ("--set", "nosuch.key=1", "prepare"): "nosuch",
        ("--set", "no_equals_sign", "prepare"): "expected KEY=VALUE",
        ("--site", str(tmp_path / "missing.tar.xz"), "prepare"): "missing.tar.xz: not found",
        ("--cpu",): "name at least one stage",
        ("--preset", "nosuch", "prepare"): "unknown preset 'nosuch'",
    }
    for args, culprit in cases.items():
        proc = gpu_stages(repo, *args, python=python, out=tmp_path / "out")
        assert proc.returncode != 0, args
        assert culprit in proc.stderr, (args, proc.stderr[-2000:])
        assert "== prepare" not in proc.stdout, args
        assert (repo / "params.yaml").read_text() == before, args
    # A failing stage stops the run: the stages after it do not start.
    proc = gpu_stages(repo, "--cpu", "train_zoo nosuch", "prepare", python=python, out=tmp_path / "out")
    assert proc.returncode == 1  # the stage's status, not the report's
    assert proc.stdout.splitlines()[-1].startswith("gpu-stages: ")  # the report still ran
    assert "unknown train_zoo variant 'nosuch'" in proc.stdout and "== prepare" not in proc.stdout
