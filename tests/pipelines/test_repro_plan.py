"""`genpipe repro --dry-run`: DVC's own plan of what would run, each training stage's estimate and the
note for data richer than the params, the total; nothing trained, no Ray, no MLflow, no data written.

Each workspace is a real DVC project (dvc.yaml, params.yaml, the code DVC hashes) that never ran.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import catalog
from pipelines import estimate, preset, repro
from pipelines.lineage import ROOT_ENV

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")
GLYPHS = {"source": "builtin:glyphs", "image_size": 32, "channels": 3, "glyphs": {"count": 120}}


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """dvc.yaml, the shipped params.yaml and the code folders DVC hashes, copied once."""
    root = tmp_path_factory.mktemp("code")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    for name in ("components", "pipelines"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture
def workspace(code, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(code, root)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv(ROOT_ENV, str(root))
    return root


def _plan(root: Path, capsys, *args: str) -> tuple[int, list[str]]:
    rc = repro.main(params=root / "params.yaml", args=list(args), dry_run=True)
    return rc, capsys.readouterr().out.splitlines()


def _seconds(line: str) -> float:
    value, unit = re.search(r"estimate ~([\d.]+) (s|min) of training", line).groups()
    return float(value) * (60 if unit == "min" else 1)


def test_a_fresh_workspace_plans_every_stage_with_its_estimate(workspace, capsys):
    import ray

    rc, lines = _plan(workspace, capsys)
    assert rc == 0
    stages = [line.strip().split(":")[0] for line in lines[1:-1] if "note:" not in line]
    assert lines[0] == (
        f"genpipe repro --dry-run: DVC would run {len(stages)} stage(s) (`dvc repro --dry --force-downstream`):"
    )
    trained = [m.command for m in catalog.MODELS]
    assert [s for s in stages if s in trained] == trained  # every training stage, in DVC's order
    assert stages[0] == "prepare" and stages[-1] == "promote" and "encode" in stages
    estimates = {line.strip().split(":")[0]: line for line in lines if "estimate ~" in line}
    assert set(estimates) == set(trained)
    ref = estimate.REFERENCES["evaluator"].digits  # the digits defaults estimate the measured run
    assert _seconds(estimates["train_evaluator"]) == round(ref.train_s)
    assert not [line for line in lines if "note:" in line]  # digits: what the params were sized for
    total = sum(round(_seconds(line)) + estimate.OVERHEAD_S for line in estimates.values())
    m = re.search(r"total ~(\d+) (s|min) for 11 training stage\(s\)", lines[-1])
    assert m and float(m.group(1)) == pytest.approx(total / (60 if m.group(2) == "min" else 1), abs=1)
    assert lines[-1].endswith("Nothing ran.")
    assert not ray.is_initialized()
    assert not {"data", "models", "mlflow.db", "reports", ".genpipe"} & {p.name for p in workspace.iterdir()}


def test_richer_data_is_noted_and_the_rgb32_preset_sizes_the_params_for_it(workspace, capsys):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["prepare"].update(GLYPHS)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rc, lines = _plan(workspace, capsys, "train_prior@gpt")  # a target narrows the plan to its upstream
    stages = [line.strip().split(":")[0] for line in lines[1:-1] if "note:" not in line]
    assert stages == ["prepare", "train_evaluator", "train_tokenizer", "encode", "train_prior@gpt"]
    assert "3 training stage(s)" in lines[-1]
    notes = [line.strip() for line in lines if "note:" in line]
    assert rc == 0 and [n.split(":")[0] for n in notes] == [
        "train_evaluator",
        "train_tokenizer",
        "train_prior@gpt",
    ]
    assert all("(3x32x32, 24 classes)" in n and "`genpipe preset rgb32`" in n for n in notes)
    before = {line.strip().split(":")[0]: _seconds(line) for line in lines if "estimate ~" in line}
    preset.main(params=workspace / "params.yaml", name="rgb32")
    rc, lines = _plan(workspace, capsys, "train_prior@gpt")
    assert rc == 0 and not [line for line in lines if "note:" in line]
    after = {line.strip().split(":")[0]: _seconds(line) for line in lines if "estimate ~" in line}
    assert all(after[s] > before[s] for s in before)  # more capacity and steps cost more


def test_a_missing_source_fails_as_dvc_says(workspace, capsys):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder:nowhere", dvc_dep="nowhere")
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rc, lines = _plan(workspace, capsys)
    assert rc != 0 and any("nowhere" in line for line in lines)
    assert not [line for line in lines if "estimate ~" in line]


def test_dvc_comes_from_path_when_none_is_beside_the_interpreter(workspace, tmp_path):
    """An environment whose bin/ has no dvc (a GPU box with DVC on PYTHONPATH, scripts/gpu-stages.sh):
    `genpipe repro` runs the dvc on PATH, and says in one line when there is none."""
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    python = env_dir / "bin" / "python"
    python.symlink_to(sys.executable)  # this venv's packages, but no dvc or genpipe beside it
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", env_dir / "pyvenv.cfg")
    (env_dir / "lib").symlink_to(Path(sys.prefix) / "lib")
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "dvc").write_text(f'#!/bin/sh\nexec {python} -m dvc "$@"\n')
    (shims / "dvc").chmod(0o755)
    env = {**os.environ, ROOT_ENV: str(workspace), "PATH": f"{shims}{os.pathsep}/usr/bin:/bin"}
    command = [str(python), "-m", "pipelines.launch", "repro", "--dry-run", "train_evaluator"]

    found = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    assert re.search(r"train_evaluator: estimate ~", found.stdout), found.stdout[-2000:]

    env["PATH"] = "/usr/bin:/bin"
    missing = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"genpipe: error: repro: no dvc beside {python} or on PATH: install DVC (pip install dvc)"
    ]
    assert "Traceback" not in missing.stderr
