"""Concurrent writers on one sqlite MLflow store: what `dvc queue start -j N` does to the default store.

K processes start together, each doing what a stage process does to the store (a run, its params and
inputs, per-step metrics, an artefact, a registered version with its lineage tags, an alias, a search),
R rounds each. Prints, per setting, the operations that failed with "database is locked" and the wall
time. Settings: `stock` (MLflow's engine as it comes: rollback journal, pysqlite's 5 s busy timeout)
and `genpipe` (pipelines/runtime.py's store settings: WAL, a 60 s busy timeout, retries).

    .venv/bin/python -m benchmarks.sweep_store --procs 4 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path


def _work(uri: str, setting: str, worker: int, rounds: int, metrics: int, start, out) -> None:
    if setting == "genpipe":
        from pipelines.runtime import safe_sqlite

        safe_sqlite()
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    locked = other = 0
    start.wait()
    for r in range(rounds):
        try:
            exp_id = client.get_experiment_by_name("genpipe").experiment_id
            tags = {"dvc.experiment": f"w{worker}"}
            run = client.create_run(exp_id, run_name=f"w{worker}r{r}", tags=tags).info.run_id
            client.log_batch(run, params=[Param(f"p{i}", str(i)) for i in range(100)])
            for step in range(metrics):
                client.log_batch(run, metrics=[Metric("main/loss", 1.0 / (step + 1), 0, step)])
            with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
                f.write("x" * 1000)
                f.flush()
                client.log_artifact(run, f.name, "plots")
            mv = client.create_model_version("genpipe-bench", f"runs:/{run}/model", run_id=run)
            for k in range(12):
                client.set_model_version_tag("genpipe-bench", mv.version, f"tag{k}", str(k))
            client.set_registered_model_alias("genpipe-bench", "challenger", mv.version)
            client.search_model_versions("name='genpipe-bench'")
            client.set_terminated(run)
        except Exception as err:  # noqa: BLE001 - counted, by kind
            if "database is locked" in str(err):
                locked += 1
            else:
                other += 1
                print(f"worker {worker}: {type(err).__name__}: {str(err)[:200]}", flush=True)
    out.put((locked, other))


def trial(setting: str, *, procs: int, rounds: int, metrics: int) -> tuple[int, int, float]:
    """(rounds that hit 'database is locked', rounds that failed otherwise, wall seconds)."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        if setting == "genpipe":
            from pipelines.runtime import safe_sqlite

            safe_sqlite()
        client = MlflowClient(tracking_uri=uri)
        client.create_experiment("genpipe", artifact_location=(Path(tmp) / "mlartifacts").as_uri())
        client.create_registered_model("genpipe-bench")
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        ps = [
            ctx.Process(target=_work, args=(uri, setting, w, rounds, metrics, start, out))
            for w in range(procs)
        ]
        for p in ps:
            p.start()
        time.sleep(8)  # every process has imported mlflow before they start together
        t0 = time.perf_counter()
        start.set()
        results = [out.get(timeout=900) for _ in ps]
        wall = time.perf_counter() - t0
        for p in ps:
            p.join()
    return sum(r[0] for r in results), sum(r[1] for r in results), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metrics", type=int, default=40, help="metric writes per run")
    parser.add_argument("--settings", default="stock,genpipe")
    args = parser.parse_args()
    for setting in args.settings.split(","):
        locked, other, wall = trial(setting, procs=args.procs, rounds=args.rounds, metrics=args.metrics)
        total = args.procs * args.rounds
        print(
            f"{setting}: {args.procs} processes x {args.rounds} runs: {locked}/{total} runs hit "
            f"'database is locked', {other} other failures, {wall:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
