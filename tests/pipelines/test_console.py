"""What a stage prints: no line from Ray's or MLflow's first-run set-up, no rate where nothing was timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.training.reporting import progress_line
from tests.conftest import REPO, project_env, run

FIRST_RUN = """
from components.config import RayConfig
from pipelines.runtime import init_ray
import ray
init_ray(RayConfig(num_cpus=1))
ray.shutdown()
"""
MLFLOW_SETUP = (
    "Creating initial MLflow database tables",
    "alembic",
    "Context impl",
    "Will assume",
    "Running upgrade",
)


def test_a_validation_only_progress_line_has_no_rate_and_no_eta():
    assert progress_line({"val/loss": 0.25}, done=50, steps=200) == "step 50/200 | val/loss 0.25"
    timed = {"perf/steps_per_s": 2.0, "perf/samples_per_s": 64.0, "train/loss": 0.5}
    assert progress_line(timed, done=50, steps=200) == (
        "step 50/200 | 2.00 it/s | 64 samples/s | ETA 75s | train/loss 0.5"
    )
    assert progress_line({}, done=1, steps=2) == "step 1/2"


def test_a_first_ray_start_on_a_machine_prints_no_token_line(tmp_path: Path):
    """A fresh HOME has no ~/.ray/auth_token: Ray makes one, and its INFO line stays off the console."""
    home = tmp_path / "home"
    home.mkdir()
    env = project_env(HOME=str(home))
    env.pop("RAY_AUTH_MODE", None)
    out = subprocess.run(
        [sys.executable, "-c", FIRST_RUN], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (home / ".ray" / "auth_token").exists(), "Ray made no token: this test tests nothing"
    assert "Generated new authentication token" not in out.stdout + out.stderr


def test_a_stage_that_creates_the_mlflow_store_does_so_quietly(repo_copy: Path):
    assert not (repo_copy / "mlflow.db").exists()
    out = run(["genpipe", "prepare"], repo_copy)
    assert (repo_copy / "mlflow.db").exists(), "the stage made no store: this test tests nothing"
    console = out.stdout + out.stderr
    assert not [line for line in console.splitlines() if any(s in line for s in MLFLOW_SETUP)], console
