"""`make bench`: a streamed fit on a two-node local cluster, its data and checkpoints in the bucket
against the same on local disk.

`scripts/local-cluster.sh up --nodes 3 --cpus 3 --head-cpus 0` (two worker nodes of 3 logical CPUs,
not isolated, so both can read this machine's disk) and a moto S3 server (tests/s3.py). Each Ray
Train worker asks for 2 CPUs, so the two land on different nodes and each node keeps one CPU for
Ray Data's read tasks (with every CPU held by a training worker fit() refuses a streamed split:
its reads would wait for ever). N procedural shapes at 32x32 RGB are prepared once and published
to the bucket under their DVC md5, as a stage publishes them.
The same fit (a tiny tokenizer, 2 Ray Train workers, one per node, STEPS x BATCH, streaming forced)
then alternates between:
- `disk`: the workers' read tasks read the shards from the local folder, checkpoints go to local disk;
- `bucket`: they read the published shards through pyarrow's S3 filesystem, checkpoints go to the bucket.

ROUNDS rounds, disk then bucket in each, so drifting load hits both alike; images/s over the steps
(the fit's own clock). The figure is the ratio bucket/disk of the medians. Peak RSS of the nodes'
Ray workers: /proc samples of every `ray::` process under the nodes' `ray start` (the raylet gives
each worker a process group of its own: a worker is found by descent, not by group). moto is an
in-process Python server: a real S3 or MinIO serves reads faster, so the ratio is a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import psutil

from benchmarks.scale import FORCE_STREAM, MIB, Peaks, _tokenizer, ray_workers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-cluster.sh"
N, ROUNDS, STEPS, BATCH = 20_000, 2, 150, 64
MODES = ("disk", "bucket")


def node_workers(groups: set[int]) -> list[psutil.Process]:
    """The Ray workers of the cluster's nodes: under the processes of the nodes' process groups
    (`ray start` and its raylet; each worker has a process group of its own)."""
    roots = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups:
                roots.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return ray_workers(roots)


def fit_once(mode: str, data: Path, published, storage: str, groups: list[int]) -> dict:
    from components.data.raydata import training_split
    from components.tokenizer.task import TokenizerTask
    from components.training.config import LoopConfig, TrainConfig
    from components.training.ray_adapter import fit

    loop = LoopConfig(steps=STEPS, batch_size=BATCH, lr=2e-3, log_every=50, checkpoint_every=STEPS // 3)
    datasets = {"train": training_split(data, "train", published=published if mode == "bucket" else None)}
    with Peaks(partial(node_workers, set(groups)), every=0.2) as peaks:
        t0 = time.perf_counter()
        result = fit(
            task_factory=partial(TokenizerTask, _tokenizer(), loop),
            loop=loop,
            train=TrainConfig(num_workers=2, cpus_per_worker=2, storage_path=storage, max_failures=0),
            run_name=f"cluster-{mode}-{time.time_ns()}",
            datasets=datasets,
        )
        wall = time.perf_counter() - t0
    assert result.data == "streamed" and len(result.nodes) == 2, (result.data, result.nodes)
    seconds = result.clock["last_step"] - result.clock["first_step"]
    return {
        "mode": mode,
        "n": N,
        "images_per_s": round(STEPS * BATCH / seconds, 1),
        "wall_s": round(wall, 1),
        "worker_peak_mib": round(peaks.peak() / MIB, 1),
        "worker_private_mib": round(peaks.peak(rss=False) / MIB, 1),
        "train_workers": sum(any("RayTrainWorker" in n for n in names) for names in peaks.names.values()),
        "load": round(os.getloadavg()[0], 2),
    }


def child(args) -> None:
    """The fits, in a process started with the cluster's environment (RAY_ADDRESS, RAY_AUTH_MODE):
    Ray reads its authentication mode when it is imported. One JSON row per fit on stdout."""
    import ray

    from components.storage import Bucket, publish
    from pipelines.bucket import dvc_md5
    from pipelines.ray_start import cluster_runtime_env

    data = args.work / "processed"
    bucket = Bucket(
        name=args.bucket, prefix="bench", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"], region=None
    )
    published = publish(data, md5=dvc_md5(data), bucket=bucket)  # there already: nothing uploaded
    groups = [int(line.split()[0]) for line in (args.work / "cluster" / "pids").read_text().splitlines()]
    ray.init(runtime_env=cluster_runtime_env(), log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = {"disk": str(args.work / "ray"), "bucket": f"s3://{args.bucket}/bench/ray"}
    for r in range(ROUNDS):
        for mode in MODES:
            row = {"round": r, **fit_once(mode, data, published, storage[mode], groups)}
            print(f"scale_cluster: {json.dumps(row)}", flush=True)
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    global N, ROUNDS, STEPS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "genpipe-scale-cluster"
    )
    ap.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md alone")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    N, ROUNDS, STEPS = args.n, args.rounds, args.steps
    os.environ.update(FORCE_STREAM, RAY_USAGE_STATS_ENABLED="0")
    if args.child:
        child(args)
        return
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    from components.data.build import build_dataset
    from components.data.config import PrepareConfig
    from components.storage import Bucket, publish
    from pipelines.bucket import dvc_md5
    from tests.s3 import s3_service
    from tests.services import free_port

    data = args.work / "processed"
    cfg = PrepareConfig(source="builtin:shapes", image_size=32, channels=3, shapes={"count": N, "size": 32})
    build_dataset(cfg, data, log=lambda line: print(line, flush=True))
    with s3_service(args.work / "s3") as s3:
        os.environ.update(s3.env)
        bucket = Bucket(name=s3.bucket, prefix="bench", endpoint_url=s3.endpoint, region=None)
        publish(data, md5=dvc_md5(data), bucket=bucket, log=print)
        folder = args.work / "cluster"
        cmd = [
            str(SCRIPT),
            "up",
            "--nodes",
            "3",
            "--cpus",
            "3",
            "--head-cpus",
            "0",
            "--port",
            str(free_port()),
        ]
        cmd += ["--mlflow-port", str(free_port()), "--dir", str(folder)]
        up = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if up.returncode:
            raise SystemExit(f"scale_cluster: local-cluster.sh up failed\n{up.stderr[-3000:]}")
        try:
            env = {**os.environ, **dict(re.findall(r"^export (\w+)=(.*)$", up.stdout, re.M))}
            cmd = [sys.executable, "-m", "benchmarks.scale_cluster", "--child", "--bucket", s3.bucket]
            cmd += ["--work", str(args.work), "--n", str(N), "--rounds", str(ROUNDS), "--steps", str(STEPS)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(
                    f"scale_cluster: the fits failed\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
                )
        finally:
            subprocess.run([str(SCRIPT), "down", "--dir", str(folder)], capture_output=True, timeout=120)
    rows = [
        json.loads(line.split(": ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("scale_cluster: {")
    ]
    median = {m: statistics.median(r["images_per_s"] for r in rows if r["mode"] == m) for m in MODES}
    text = section(rows, median)
    print(text)
    if not args.no_write:
        from benchmarks.scale_report import replace_section

        replace_section(REPO / "BENCHMARKS.md", "## Scale: two nodes", text)


def section(rows: list[dict], median: dict[str, float]) -> str:
    lines = [
        "## Scale: two nodes, bucket against local disk (`make bench`, `benchmarks/scale_cluster.py`)",
        "",
        f"{N:,} shapes at 32x32 RGB; `local-cluster.sh up --nodes 3 --cpus 3 --head-cpus 0`: two worker nodes of "
        f"3 logical CPUs on this 2-core machine, one Ray Train worker of 2 CPUs on each (the third reads); a streamed fit of {STEPS} steps of {BATCH}. "
        "`disk`: shards and checkpoints on local disk; `bucket`: shards read from the published copy and "
        "checkpoints written to a moto S3 server (a Python process on the same cores: a floor for a real "
        "object store). Rounds alternate the modes; images/s over the steps.",
        "",
        "| round | mode | images/s | wall (s) | worker peak RSS (MiB, max) | of it private | "
        "Train workers sampled | load 1-min |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['round']} | {r['mode']} | {r['images_per_s']:,.1f} | {r['wall_s']:,.1f} | "
            f"{r['worker_peak_mib']:,.0f} | {r['worker_private_mib']:,.0f} | {r['train_workers']} | "
            f"{r['load']} |"
            for r in rows
        ),
        "",
        f"Median images/s: disk {median['disk']:,.1f}, bucket {median['bucket']:,.1f}; "
        f"bucket / disk = **{median['bucket'] / median['disk']:.2f}** (target >= 0.90).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
