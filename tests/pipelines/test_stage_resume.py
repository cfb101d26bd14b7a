"""A training stage whose whole process is killed resumes on re-run: same Ray run, same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import project_env, run
from tests.pipelines.test_stages import TINY

pytestmark = pytest.mark.slow


def test_killed_stage_resumes_its_checkpoint_and_its_run(tmp_path: Path):
    params = {k: v for k, v in TINY.items() if k in ("train", "ray", "prepare", "train_evaluator")}
    params["train_evaluator"] = {
        **TINY["train_evaluator"],
        "loop": {**TINY["train_evaluator"]["loop"], "steps": 400, "checkpoint_every": 40, "val_every": 0},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run(["genpipe", "prepare"], tmp_path)

    proc = subprocess.Popen(
        ["genpipe", "train_evaluator"],
        cwd=tmp_path,
        env=project_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    storage = tmp_path / ".genpipe/ray_results"
    deadline = time.time() + 300
    # Ray writes this snapshot when its controller registers a reported checkpoint; a report not
    # yet polled would be lost with the killed process.
    while not list(storage.glob("train_evaluator-*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None, "the stage ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=60)

    out = run(["genpipe", "train_evaluator"], tmp_path).stdout
    assert "continuing MLflow run" in out
    assert "resumed run train_evaluator-" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("genpipe")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`genpipe.stage` = 'train_evaluator'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "main/loss")]
    assert steps == sorted(set(steps)), "a step was logged twice"
    assert steps[-1] == 400
