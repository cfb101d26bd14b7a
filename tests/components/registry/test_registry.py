"""Tracking sink and model registry against real MLflow stores: a sqlite file, and `mlflow server` over
HTTP on a sqlite file and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
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
from tests import services


def _new_run(uri: str, tmp: Path) -> str:
    return MlflowClient(tracking_uri=uri).create_run(experiment(uri, tmp)).info.run_id


def experiment(uri: str, tmp: Path, name: str = "t") -> str:
    """The test experiment's id, created if new: artefacts under `tmp`, or through the server over HTTP."""
    client = MlflowClient(tracking_uri=uri)
    if found := client.get_experiment_by_name(name):
        return found.experiment_id
    location = None if uri.startswith("http") else (tmp / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


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
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` over HTTP on a sqlite file, for this test alone."""
    with services.mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server") as url:
        yield url


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_http_tracking_server(backend: str, request, tmp_path: Path):
    """The same calls through `mlflow server`: on a sqlite file, and on PostgreSQL as teams run it."""
    uri = request.getfixturevalue({"sqlite": "mlflow_server", "postgres": "postgres_registry"}[backend])
    _exercise(uri, tmp_path)
