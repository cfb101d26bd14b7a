"""A cluster whose nodes share only a bucket, as separate processes on this machine.

What README's "Scale out" and docs/scale-out.md show, end to end: `scripts/local-cluster.sh up
--isolate` starts a head with no CPUs (it can hold no worker), two worker nodes, each in its own
mount namespace where the checkout and the test's folders are an empty tmpfs, and `mlflow server`
with its artefacts in the bucket. The bucket is a real S3 server (moto, authentication on:
tests/s3.py) reached through pyarrow, boto3 and MLflow's own clients.

`genpipe train_evaluator` then trains with `train.num_workers=2`, one worker per node, checkpoints in
the bucket. Once a checkpoint is there, one worker node is SIGKILLed and `local-cluster.sh add`
starts another: Ray Train restarts the worker group and the loop resumes from the bucket's
checkpoint, in the same MLflow run. Then `genpipe encode` runs on the same nodes: its actors get the
tokenizer's bytes and read the images from the bucket. One run of the cluster serves every check (it
is the suite's most expensive fixture).

What this test leaves to cheaper ones: Ray Train on splits read from the bucket is the evaluator's
path here, the same for every training stage, so no second stage trains; the tokenizer is an untrained
one of the stage's own shape (encode's output does not depend on its quality); data/tokens read from
a bucket by Ray Data's tasks is `test_streaming`'s encode test, on a local Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient

from components.io import save_model
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.vqgan import VQGAN
from tests.conftest import REPO, project_env, run
from tests.pipelines.test_stages import TINY
from tests.s3 import S3, s3  # noqa: F401  (the session's S3 server)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # a loaded machine: 2-3x its quiet ~4 min

SCRIPT = REPO / "scripts" / "local-cluster.sh"
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())
STEPS = 300  # long enough to kill a node between the first checkpoint (step 100) and the end

PROBE = """
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from pipelines.ray_start import cluster_runtime_env
ray.init(runtime_env=cluster_runtime_env(), log_to_driver=False, logging_level="ERROR")

@ray.remote(num_cpus=0)
def look(paths):
    import components
    return {"seen": [p for p in paths if os.path.exists(p)], "code": components.__file__}

out = {}
for node in ray.nodes():
    if node["Alive"] and node["Resources"].get("CPU", 0) > 0:  # the worker nodes
        where = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        out[node["NodeID"]] = ray.get(look.options(scheduling_strategy=where).remote(json.loads(os.environ["PATHS"])))
print(json.dumps(out))
"""


def _free_ports(n: int) -> list[int]:
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


def _script(*args: str, env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"local-cluster.sh {args[0]} exited {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def _group(folder: Path, name: str) -> int:
    """The process group `up` or `add` recorded for the node called `name`."""
    rows = (line.split() for line in (folder / "pids").read_text().splitlines())
    return next(int(pgid) for pgid, who in rows if who == name)


def _kill_node(folder: Path, name: str) -> None:
    """SIGKILL every process of node `name`, as a lost machine: its group (`ray start`, the raylet)
    and their descendants, which the raylet starts in process groups of their own (the workers)."""
    group = _group(folder, name)
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == group]
    doomed = {p.pid: p for p in members}
    for p in members:
        with contextlib.suppress(psutil.Error):
            doomed |= {c.pid: c for c in p.children(recursive=True)}
    for p in doomed.values():
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.fixture
def cluster(repo_copy: Path, tmp_path: Path, s3: S3):  # noqa: F811
    """`up --isolate` with a bucket, while `genpipe prepare` runs (it needs no Ray); `down` at the end."""
    ray_port, mlflow_port = _free_ports(2)
    folder, prefix = tmp_path / "cluster", f"cluster-{os.getpid()}-{ray_port}"
    args = ["--nodes", "3", "--head-cpus", "0", "--port", str(ray_port), "--mlflow-port", str(mlflow_port)]
    args += ["--dir", str(folder), "--isolate", "--hide", str(tmp_path)]
    args += ["--artifacts", f"s3://{s3.bucket}/{prefix}/mlartifacts"]
    params = {
        "train": {
            **TINY["train"],
            "storage_path": f"s3://{s3.bucket}/{prefix}/ray",
            "num_workers": 2,  # 1 CPU each, 1 CPU per worker node: one worker per node
            "use_gpu": False,  # encode's params in dvc.yaml
            "max_failures": 2,
        },
        "prepare": {**TINY["prepare"], "dvc_dep": SHIPPED["prepare"]["dvc_dep"]},  # dvc.yaml names it
        "storage": {"bucket": s3.bucket, "prefix": prefix},
        "train_evaluator": {
            **TINY["train_evaluator"],
            # A checkpoint every 100 steps: each goes to the bucket from both workers (~2 s here)
            "loop": {
                **TINY["train_evaluator"]["loop"],
                "steps": STEPS,
                "val_every": 100,
                "checkpoint_every": 100,
            },
        },
        **{k: TINY[k] for k in ("train_tokenizer", "encode")},
    }
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    up = subprocess.Popen(
        [str(SCRIPT), "up", *args],
        env=project_env(**s3.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run(["dvc", "repro", "prepare"], repo_copy, **s3.env)  # dvc.lock keys the bucket's copy
        out, err = up.communicate(timeout=400)
        assert up.returncode == 0, f"local-cluster.sh up exited {up.returncode}\n{err[-3000:]}"
        env = dict(re.findall(r"^export (\w+)=(.*)$", out, re.M))
        assert env == dict(re.findall(r"^export (\w+)=(.*)$", (folder / "env").read_text(), re.M))
        nodes = re.findall(r"^local-cluster: node (\w+) ", err, re.M)
        yield {**s3.env, **env}, nodes, folder, prefix
    finally:
        up.kill()
        _script("down", "--dir", str(folder), env=project_env(), timeout=120)
    # Every process of it is gone: Ray's (its temp dir names the port) and the MLflow server.
    assert _cluster_processes(f"genpipe-ray-{ray_port}") == []
    assert _cluster_processes(f"--port {mlflow_port}") == []
    assert not (Path(os.environ.get("TMPDIR", "/tmp")) / f"genpipe-ray-{ray_port}").exists()


def test_a_stage_trains_on_isolated_nodes_from_a_bucket_and_survives_a_killed_node(
    repo_copy: Path,
    cluster,
    s3: S3,  # noqa: F811
):
    env, nodes, folder, prefix = cluster
    assert {"RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"} <= set(env) and len(set(nodes)) == 3

    # Each worker node sees neither the checkout nor the test's files, and runs the code genpipe ships
    # (the probe asks while the stage starts: its tasks take no CPU).
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=project_env(**env, PATHS=json.dumps([str(REPO / "components"), str(repo_copy / "params.yaml")])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stage = subprocess.Popen(
        ["genpipe", "train_evaluator"],
        cwd=repo_copy,
        env=project_env(**env, GENPIPE_IN_DRIVER_BYTES="0"),  # Ray Data reads the splits: from the bucket
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, err = probe.communicate(timeout=300)
        assert probe.returncode == 0, err[-3000:]
        workers = json.loads(out.strip().splitlines()[-1])
        assert len(workers) == 2, workers
        for seen in workers.values():
            assert seen["seen"] == [] and "runtime_resources/py_modules_files" in seen["code"], seen

        # SIGKILL one worker node once a checkpoint is in the bucket and Ray Train's controller has
        # registered it (its snapshot: a checkpoint uploaded but not yet registered is not resumed
        # from, and the restarted workers would start afresh); the cluster then gets a new node.
        deadline = time.monotonic() + 300
        while not [k for k in s3.keys(f"{prefix}/ray/") if k.endswith("/checkpoint_manager_snapshot.json")]:
            assert stage.poll() is None, stage.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.2)
        _kill_node(folder, "node-2")
        _script("add", "--dir", str(folder), env=project_env(**env))
        out, _ = stage.communicate(timeout=600)
    finally:
        for proc in (probe, stage):
            if proc.poll() is None:
                proc.kill()
    assert stage.returncode == 0, out[-4000:]
    assert "train_evaluator: 2 workers on 2 nodes" in out
    resumed = re.search(r"train_evaluator: resumed run \S+ from step (\d+)", out)
    assert resumed and 0 < int(resumed.group(1)) < STEPS, out[-3000:]
    assert len(re.findall(rf"step {STEPS}/{STEPS} \|", out)) == 1  # each worker line once

    # One MLflow run, finished, with ranks 0 and 1 on the two live nodes: not the killed one.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("genpipe")
    runs = client.search_runs([experiment.experiment_id], "tags.`genpipe.stage` = 'train_evaluator'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_ = runs[0]
    placed = json.loads(run_.data.tags["ray.worker_nodes"])
    assert run_.data.tags["ray.num_nodes"] == "2" and len(placed) == 2
    killed = set(workers) - set(placed)
    assert len(killed) == 1 and set(placed) - set(workers)  # one of the first two, and the new node
    assert sorted(r for node in placed.values() for r in node["ranks"]) == [0, 1]
    # The curves rank 0 logged over HTTP reach the end; steps logged before the kill may repeat.
    loss = {m.step for m in client.get_metric_history(run_.info.run_id, "main/loss")}
    assert loss == set(range(10, STEPS + 1, 10))
    assert 0.0 <= run_.data.metrics["final/test_accuracy"] <= 1.0
    # The model is registered from that run; its files, and the checkpoints, are bucket objects.
    versions = client.search_model_versions("name = 'genpipe-evaluator'")
    assert [v.run_id for v in versions] == [run_.info.run_id]
    keys = s3.keys(f"{prefix}/")
    assert [k for k in keys if k.startswith(f"{prefix}/mlartifacts/") and k.endswith("model.safetensors")]
    assert [k for k in keys if k.startswith(f"{prefix}/ray/") and "/checkpoint_" in k]
    assert not list(folder.rglob("*.safetensors")) and not list(
        repo_copy.glob("mlartifacts/**/*.safetensors")
    )
    assert not list((repo_copy / ".genpipe").rglob("checkpoint_*"))  # nothing went to local files
    # The prepared folder is in the bucket under its DVC md5, and the workers' read tasks read it there.
    md5 = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]["md5"]
    published = [k for k in keys if k.startswith(f"{prefix}/data/{md5.removesuffix('.dir')}/")]
    assert any(k.endswith("meta.json") for k in published) and any("/train-" in k for k in published)
    assert f"s3://{s3.bucket}/{prefix}/data/" in out  # publish's progress line

    # Encode on the same nodes: an untrained tokenizer of the stage's shape (the nodes cannot see
    # models/: the actors get its bytes), the images read from the bucket by Ray Data's tasks.
    vqgan = VQGAN(TokenizerConfig(**TINY["train_tokenizer"]["model"]))
    save_model(repo_copy / "models" / "tokenizer", vqgan.state_dict(), vqgan.config_dict())
    proc = run(["genpipe", "encode"], repo_copy, **env, GENPIPE_IN_DRIVER_BYTES="0")
    counts = json.loads((repo_copy / "data" / "processed" / "meta.json").read_text())["counts"]
    tokens = json.loads((repo_copy / "data" / "tokens" / "meta.json").read_text())
    assert tokens["counts"] == counts and tokens["grid"] == [4, 4], proc.stdout[-3000:]
    ids = pq.read_table(repo_copy / "data" / "tokens" / tokens["shards"]["test"][0], columns=["id"])
    first = pq.read_table(repo_copy / "data" / "processed" / "test-00000.parquet", columns=["id"])
    assert ids.column("id").to_pylist()[: first.num_rows] == first.column("id").to_pylist()  # shard order
    encode = client.search_runs([experiment.experiment_id], "tags.`genpipe.stage` = 'encode'")
    assert len(encode) == 1 and encode[0].info.status == "FINISHED"
