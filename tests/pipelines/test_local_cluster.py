"""A training stage on a Ray cluster of separate processes, logging to an `mlflow server` over HTTP.

What README's "Scale out" shows: `scripts/local-cluster.sh up` starts `ray start --head`, a second
node with `ray start --address` (1 CPU each) and `mlflow server`, each in its own process group;
`genpipe train_evaluator` then runs with the exported RAY_ADDRESS / RAY_AUTH_MODE /
MLFLOW_TRACKING_URI and `train.num_workers=2`, so each node holds one worker.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO, project_env, run
from tests.pipelines.test_stages import TINY

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "local-cluster.sh"


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_processes(marker: str) -> list[str]:
    """Command lines of live processes that belong to the cluster (its temp dir or ports)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if marker in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmd[:200])
    return found


@pytest.fixture
def cluster(repo_copy: Path, tmp_path: Path):
    """`up` in the background while `genpipe prepare` runs (nothing of it uses Ray); `down` at the end."""
    ray_port, mlflow_port = _free_ports(2)
    folder = tmp_path / "cluster"
    args = ["--port", str(ray_port), "--mlflow-port", str(mlflow_port), "--dir", str(folder)]
    up = subprocess.Popen(
        [str(SCRIPT), "up", *args],
        cwd=repo_copy,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run(["genpipe", "prepare"], repo_copy)
        out, err = up.communicate(timeout=400)
        assert up.returncode == 0, f"local-cluster.sh up exited {up.returncode}\n{err[-3000:]}"
        env = dict(re.findall(r"^export (\w+)=(.*)$", out, re.M))
        assert env == dict(re.findall(r"^export (\w+)=(.*)$", (folder / "env").read_text(), re.M))
        nodes = re.findall(r"^local-cluster: node (\w+) ", err, re.M)
        yield env, nodes, folder
    finally:
        up.kill()
        down = subprocess.run(
            [str(SCRIPT), "down", "--dir", str(folder)], env=project_env(), capture_output=True, text=True
        )
        assert down.returncode == 0, down.stderr
    # Every process of it is gone: Ray's (its temp dir names the port) and the MLflow server.
    assert _cluster_processes(f"genpipe-ray-{ray_port}") == []
    assert _cluster_processes(f"--port {mlflow_port}") == []
    assert not (Path(os.environ.get("TMPDIR", "/tmp")) / f"genpipe-ray-{ray_port}").exists()


def test_a_stage_trains_on_two_nodes_and_logs_to_an_mlflow_server(repo_copy: Path, cluster):
    env, nodes, folder = cluster
    assert set(env) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"} and len(set(nodes)) == 2
    params = {
        "train": {**TINY["train"], "num_workers": 2},  # 1 CPU each, 1 CPU per node: one worker per node
        "prepare": TINY["prepare"],
        "train_evaluator": TINY["train_evaluator"],
    }
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    proc = run(["genpipe", "train_evaluator"], repo_copy, **env)

    console = proc.stdout + proc.stderr
    assert "train_evaluator: 2 workers on 2 nodes" in proc.stdout
    assert "Traceback" not in console and "Found multiple active Ray instances" not in console
    assert len(re.findall(r"step 40/40 \|", console)) == 1  # each worker line once

    # Both nodes trained: the run names the node of each rank, and they are the cluster's two.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("genpipe")
    runs = client.search_runs([experiment.experiment_id], "tags.`genpipe.stage` = 'train_evaluator'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_ = runs[0]
    placed = json.loads(run_.data.tags["ray.worker_nodes"])
    assert run_.data.tags["ray.num_nodes"] == "2"
    assert sorted(placed) == sorted(nodes)
    assert sorted(r for node in placed.values() for r in node["ranks"]) == [0, 1]
    # One run holds the curves rank 0 logged over HTTP, each step once, and the final metrics.
    loss = [m.step for m in client.get_metric_history(run_.info.run_id, "main/loss")]
    assert loss == [10, 20, 30, 40]
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "val/accuracy")] == [20, 40]
    assert 0.0 <= run_.data.metrics["final/test_accuracy"] <= 1.0
    # The model is registered from that run, and its files sit in the server's artefact store.
    versions = client.search_model_versions("name = 'genpipe-evaluator'")
    assert [v.run_id for v in versions] == [run_.info.run_id]
    assert list((folder / "mlartifacts").rglob("model.safetensors"))
    assert not list(repo_copy.glob("mlartifacts/**/model.safetensors"))  # nothing went to local files
