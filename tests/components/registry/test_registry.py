"""Tracking sink and model registry against real MLflow stores: a sqlite file and an HTTP server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from components.io import load_model, save_model
from components.registry.registry import (
    download,
    list_versions,
    register_version,
    registered_name,
    set_alias,
    version_by_alias,
)
from components.registry.tracking import STEP_KEY, MlflowSink


def _new_run(uri: str, tmp: Path) -> str:
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp / "artifacts").as_uri())
    return client.create_run(exp).info.run_id


def _exercise(uri: str, tmp: Path) -> None:
    run_id = _new_run(uri, tmp)
    sink = MlflowSink(uri, run_id)
    assert sink.last_step() == -1
    for step in (10, 20, 30):
        sink.log({"train/loss": 1.0 / step, "bad": float("nan")}, step)
    # A fresh sink (a restarted worker) sees what was logged and skips replayed steps.
    again = MlflowSink(uri, run_id)
    assert again.last_step() == 30
    again.log({"train/loss": 123.0}, 20)
    again.log({"train/loss": 0.01}, 40)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [10, 20, 30, 40]
    assert all(m.value != 123.0 for m in history)
    assert client.get_metric_history(run_id, "bad") == []
    assert len(client.get_metric_history(run_id, STEP_KEY)) == 4

    model_dir = tmp / "model"
    save_model(model_dir, {"w": torch.arange(6.0).reshape(2, 3)}, {"kind": "toy"})
    client.log_artifacts(run_id, str(model_dir), "model")
    name = registered_name("evaluator")
    v1 = register_version(
        tracking_uri=uri, name=name, run_id=run_id, artifact_path="model", tags={"git_commit": "abc"}
    )
    v2 = register_version(tracking_uri=uri, name=name, run_id=run_id, artifact_path="model", tags={})
    assert (v1, v2) == ("1", "2")
    set_alias(tracking_uri=uri, name=name, alias="champion", version=v1)
    assert version_by_alias(tracking_uri=uri, name=name, alias="champion") == "1"
    assert version_by_alias(tracking_uri=uri, name=name, alias="challenger") is None
    rows = list_versions(tracking_uri=uri)
    assert [r["version"] for r in rows] == ["1", "2"] and rows[0]["aliases"] == ["champion"]
    assert rows[0]["tags"]["git_commit"] == "abc"
    got = download(tracking_uri=uri, name=name, alias="champion", dst=tmp / "dl")
    state, config = load_model(got)
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3)) and config == {"kind": "toy"}


def test_sqlite_store(tmp_path: Path):
    _exercise(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)


def test_unknown_family_lists_valid():
    with pytest.raises(ValueError, match="valid: .*tokenizer"):
        registered_name("gpt")


@pytest.fixture
def mlflow_server(tmp_path: Path, free_port: int):
    port = free_port
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "served-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # a loaded 2-core machine can take over a minute to start it
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited during start-up")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not become healthy in 180 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=60)  # gunicorn winds down slowly on a loaded machine
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the workers go too
        proc.wait()


def test_http_tracking_server(mlflow_server: str, tmp_path: Path):
    _exercise(mlflow_server, tmp_path)
