"""What a stage prints: no line from Ray's or MLflow's first-run set-up, no rate where nothing was timed,
and a timing line that books a failed attempt's training as training."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from components.training.reporting import progress_line
from pipelines.training import ATTEMPT_KEY
from tests.conftest import project_env, run
from tests.pipelines.test_stages import TINY

FIRST_RUN = (
    "Generated new authentication token",
    "MLflow database tables",
    "Updating database tables",
    "alembic",
)
LOOP = {"steps": 200, "log_every": 10, "val_every": 100, "checkpoint_every": 100}


def test_a_validation_only_progress_line_has_no_rate_and_no_eta():
    assert progress_line({"val/loss": 0.25}, done=50, steps=200) == "step 50/200 | val/loss 0.25"
    timed = {"perf/steps_per_s": 2.0, "perf/samples_per_s": 64.0, "train/loss": 0.5}
    assert progress_line(timed, done=50, steps=200) == (
        "step 50/200 | 2.00 it/s | 64 samples/s | ETA 75s | train/loss 0.5"
    )
    assert progress_line({}, done=1, steps=2) == "step 1/2"


@pytest.mark.slow  # a Ray instance, a worker restart: ~45 s on an idle 2-core machine
def test_a_first_run_is_quiet_and_a_killed_worker_s_training_counts_as_training(
    repo_copy: Path, tmp_path: Path
):
    """A machine's first run (a fresh HOME: no ~/.ray/auth_token, no mlflow.db), whose only worker is
    SIGKILLed mid-training; Ray Train restarts it (max_failures: 1) and the stage finishes."""
    home, mark = tmp_path / "home", uuid.uuid4().hex
    home.mkdir()
    params = {
        "train": {**TINY["train"], "max_failures": 1},
        "ray": TINY["ray"],
        "prepare": TINY["prepare"],
        "train_evaluator": {**TINY["train_evaluator"], "loop": {**TINY["train_evaluator"]["loop"], **LOOP}},
    }
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = run(["genpipe", "prepare"], repo_copy, HOME=str(home))
    assert (repo_copy / "mlflow.db").exists(), "no store was created: this test tests nothing"
    stage = subprocess.Popen(
        ["genpipe", "train_evaluator"],
        cwd=repo_copy,
        env=project_env(HOME=str(home), GENPIPE_TEST_MARK=mark),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, killed = [], None
    for line in stage.stdout:
        lines.append(line)
        if killed is None and len([x for x in lines if re.search(r"step \d+/200", x)]) == 6:
            for pid in _train_workers(mark):
                os.kill(pid, signal.SIGKILL)
            killed = time.time()
    assert stage.wait(timeout=600) == 0, "".join(lines[-40:])
    assert killed is not None and (home / ".ray" / "auth_token").exists()
    console = prepared.stdout + prepared.stderr + "".join(lines)
    assert not [line for line in console.splitlines() if any(s in line for s in FIRST_RUN)]
    # the timing line: both attempts' training, from their start marks to their last logged step
    (timing,) = [x for x in lines if x.startswith("train_evaluator: ") and " = training " in x]
    training = float(re.search(r" = training ([\d.]+) ", timing).group(1))
    client = MlflowClient(tracking_uri=f"sqlite:///{repo_copy / 'mlflow.db'}")
    (run_,) = client.search_runs(
        [client.get_experiment_by_name("genpipe").experiment_id], "tags.`genpipe.stage` = 'train_evaluator'"
    )
    starts = sorted(m.timestamp / 1000 for m in client.get_metric_history(run_.info.run_id, ATTEMPT_KEY))
    assert len(starts) == 2 and starts[0] < killed < starts[1], "not one attempt killed, one retried"
    logged = [m.timestamp / 1000 for m in client.get_metric_history(run_.info.run_id, "train/step")]
    first = max(t for t in logged if t < killed) - starts[0]
    second = max(logged) - starts[1]
    assert training >= first + second - 0.1, timing  # before: `second` only, `first` in `workers`


def _train_workers(mark: str) -> list[int]:
    """Ray Train worker processes of this test's stage only (they inherit its GENPIPE_TEST_MARK)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            ours = proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
            if ours and f"GENPIPE_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    assert pids, "no Ray Train worker of this stage found"
    return pids
