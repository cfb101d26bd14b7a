"""The stage runtime: the MLflow run a stage opens, its timing line, and the Ray log filters."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from components.config import load_stage
from pipelines.ray_start import quiet_ray_logs
from pipelines.runtime import EXPERIMENT_KIND, SQLITE_BUSY_TIMEOUT_MS, stage_run, tracking_uri
from pipelines.timing import StageClock


def test_stage_run_marks_the_experiment_and_logs_its_data_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("GENPIPE_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.lock").write_text(
        yaml.safe_dump({"stages": {"prepare": {"outs": [{"path": "data/processed", "md5": "abc123.dir"}]}}})
    )
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    sections = load_stage(params, "prepare")
    with stage_run("prepare", sections, data_deps=["data/processed", "models/evaluator"]) as run:
        run_id = run.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert client.get_experiment(got.info.experiment_id).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    inputs = {d.dataset.name: d.dataset.digest for d in got.inputs.dataset_inputs}
    assert inputs == {"data/processed": "abc123.dir", "models/evaluator": "untracked"}


def test_the_timing_line_splits_wall_time_into_training_and_overhead():
    clock = StageClock()
    start = clock.marks["process"]
    marks = {"cli": 1.0, "imported": 3.0, "ray_start": 4.0, "ray": 5.0, "data": 5.5, "worker": 9.0}
    marks |= {"first_step": 10.0, "last_step": 30.0, "fit": 31.0}
    clock.marks.update({k: start + v for k, v in marks.items()})
    assert clock.training_seconds() == 20.0
    line = clock.line("train_zoo@gan")
    total = clock.marks["end"] - start
    assert line.startswith(f"train_zoo@gan: {total:.1f} s = training 20.0 + overhead {total - 20:.1f} s (")
    assert "workers 3.5, worker setup 1.0, fit return 1.0" in line


def test_quiet_drops_only_the_named_noise():
    quiet_ray_logs()
    quiet_ray_logs()  # idempotent: one filter per logger
    from ray.train.v2._internal.execution.controller import placement_group_cleaner  # Ray's own logger

    logger = placement_group_cleaner.logger
    assert len(logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # Ray's loggers do not propagate
    logger.addHandler(handler)
    try:
        logger.warning("Failed to query Ray Train Controller actor state. State API may be unavailable.")
        logger.warning(
            "Detected that the Ray Train controller actor (x) is dead. Cleaning up placement group"
        )
    finally:
        logger.removeHandler(handler)
    assert [m[:8] for m in seen] == ["Detected"]  # a real problem still shows


def test_a_failed_attempts_training_is_booked_as_training_not_workers(tmp_path):
    """Ray Train restarts the workers after a failure: rank 0's sink marks each attempt's start in the
    stage's MLflow run, and the driver moves the failed one's training (start to its last logged
    step) out of `workers`. The attempts here are real sinks over a real store, one after another."""
    from pipelines.training import AttemptSink, failed_attempts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    clock = StageClock()
    clock.mark("data")
    first = AttemptSink(uri, run_id)  # the attempt that fails after logging step 20
    asked = time.time()
    assert first.last_step() == -1
    started = time.time()  # its first step
    for step in (10, 20):
        time.sleep(0.05)
        last_log = time.time()
        first.log({"train/loss": 1.0}, step)
    ended = time.time()
    time.sleep(0.05)  # the failure, the restart
    clock.mark("worker")
    second = AttemptSink(uri, run_id)  # the retried attempt resumes: steps up to 20 are logged
    assert second.last_step() == 20
    clock.mark("first_step")
    second.log({"train/loss": 0.5}, 30)
    clock.mark("last_step")
    clock.mark("fit")
    spans = failed_attempts(uri, run_id, since=clock.marks["data"], until=clock.marks["worker"])
    assert len(spans) == 1
    (start, end) = spans[0]
    assert asked - 0.001 <= start <= started and last_log - 0.001 <= end <= ended  # ms timestamps
    before = clock.phases()
    clock.retried = spans
    after = clock.phases()
    assert after["training"] == pytest.approx(before["training"] + (end - start))
    assert after["workers"] == pytest.approx(before["workers"] - (end - start))
    assert clock.training_seconds() == pytest.approx(after["training"])


def test_every_quieted_logger_is_the_one_its_ray_module_logs_with():
    """A Ray upgrade that moves a module or renames its logger fails here, not silently."""
    import importlib

    from components.training.ray_trims import QUIET_LOGS

    for name in QUIET_LOGS:
        module = importlib.import_module(name)
        assert module.logger.name == name, name


def test_an_experiments_temporary_copy_logs_into_the_users_store(tmp_path, monkeypatch):
    """A stage in DVC's temporary copy of the repo (a queued experiment) opens the user's store, beside
    the user's artefacts, tags its run with the experiment, and every connection waits for writers."""
    user = tmp_path / "repo"
    copy = user / ".dvc/tmp/exps/tmp1234"
    copy.mkdir(parents=True)
    (copy / "params.yaml").write_text("{}\n")
    monkeypatch.setenv("GENPIPE_ROOT", str(copy))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(user))
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-2")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    sections = load_stage(copy / "params.yaml", "prepare")
    assert tracking_uri(sections["mlflow"]) == f"sqlite:///{user / 'mlflow.db'}"
    with stage_run("prepare", sections) as run:
        run_id = run.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{user / 'mlflow.db'}")
    got = client.get_run(run_id)
    assert got.data.tags["dvc.experiment"] == "sweep-2" and got.data.tags["dvc.baseline_rev"] == "b" * 40
    assert got.info.artifact_uri.startswith((user / "mlartifacts").as_uri())
    assert not (copy / "mlflow.db").exists() and not (copy / "mlartifacts").exists()
    with sqlite3.connect(user / "mlflow.db") as db:  # WAL is kept in the file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    from mlflow.store.db.utils import create_sqlalchemy_engine

    raw = create_sqlalchemy_engine(f"sqlite:///{user / 'mlflow.db'}").raw_connection()  # MLflow's engine
    try:  # (MLflow's sessions set their own 20 s; migrations and inspection run outside them)
        assert raw.cursor().execute("PRAGMA busy_timeout").fetchone() == (SQLITE_BUSY_TIMEOUT_MS,)
    finally:
        raw.close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a named store still wins
    assert tracking_uri(sections["mlflow"]) == "http://127.0.0.1:5000"


def test_a_store_removed_without_its_write_ahead_log_is_one_line(tmp_path, monkeypatch):
    # `rm mlflow.db` leaves mlflow.db-wal when a process still holds the store: a new file beside that
    # log gives "disk I/O error" later, so the store is refused before anything opens it.
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cfg = load_stage(Path(__file__).parents[2] / "params.yaml", "prepare")["mlflow"]
    uri = tracking_uri(cfg)
    holder = sqlite3.connect(db)  # another process's open store, in WAL mode with a write pending
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("CREATE TABLE t (x)")
    holder.commit()
    assert (tmp_path / "mlflow.db-wal").exists()
    db.unlink()
    with pytest.raises(FileNotFoundError) as err:
        tracking_uri(cfg)
    line = str(err.value)
    assert "\n" not in line and "mlflow.db-wal" in line and str(db) in line
    assert not db.exists()  # nothing opened it
    holder.close()
    for leftover in tmp_path.glob("mlflow.db-*"):
        leftover.unlink()
    assert tracking_uri(cfg) == uri  # a fresh store is fine
