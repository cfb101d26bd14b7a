"""A sweep the DVC way: three queued experiments run two at a time, each in DVC's temporary copy of
the repository, and record into the user's MLflow store, on one Ray, as the README documents it."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines.lineage import DVC_TEMP_COPIES
from tests.conftest import run
from tests.pipelines.test_stages import TINY
from tests.test_dvc_repro import _narrow_dag

pytestmark = pytest.mark.slow

KNOB = "train_zoo.vae.loop.lr"
SWEEP = {"sweep-1": "0.001", "sweep-2": "0.004", "sweep-3": "0.008"}  # experiment name -> knob value
MODEL = "genpipe-vae"
#: Stages the one generator does not need (the two-stage path, the results table): what is left is
#: prepare, train_evaluator, train_zoo@vae, evaluate@vae and promote
UNUSED = ("train_tokenizer", "encode", "train_diffusion", "train_prior", "report")
BASELINE = "baseline"
TEMP_COPY = DVC_TEMP_COPIES.as_posix()  # where DVC runs a queued experiment: must appear in no record


def _tiny_vae_repo(repo: Path) -> None:
    """The tiny params, the DAG narrowed to one generator, and its committed baseline run (as after
    `make run`): data, judge, the generator trained, judged and promoted."""
    params = repo / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw |= {k: v for k, v in TINY.items() if k not in ("train", "ray", "prepare")}
    raw["ray"]["num_cpus"] = 2
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    _narrow_dag(repo, ("vae",))
    dag = yaml.safe_load((repo / "dvc.yaml").read_text())
    for stage in UNUSED:
        del dag["stages"][stage]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    run(["git", "commit", "-qam", "tiny params, one generator"], repo)
    run(["genpipe", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)


@pytest.mark.timeout(1800)
def test_a_queued_sweep_records_where_the_user_looks(repo_copy: Path):
    _tiny_vae_repo(repo_copy)
    baseline = run(["git", "rev-parse", "HEAD"], repo_copy).stdout.strip()
    for name, value in SWEEP.items():  # each re-runs train_zoo@vae, evaluate@vae and promote
        run(["genpipe", "exp", "run", "--queue", "-n", name, "-S", f"{KNOB}={value}"], repo_copy)
    started = time.perf_counter()
    try:
        proc = run(["genpipe", "exp", "run", "--run-all", "-j", "2"], repo_copy, check=False)
    finally:
        run(["dvc", "queue", "stop", "--kill"], repo_copy, check=False)
    print(f"sweep of {len(SWEEP)} experiments, 2 at a time: {time.perf_counter() - started:.1f} s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    status = run(["dvc", "queue", "status"], repo_copy).stdout
    assert all(f"{name}" in status for name in SWEEP) and status.count("Success") == len(SWEEP), status
    assert "database is locked" not in out
    # One Ray for all: `genpipe exp run --run-all` started it, the experiments' stages joined it.
    assert out.count("Started a local Ray instance") == 1, out[-4000:]
    assert out.count("Running stage 'train_zoo@vae'") == len(SWEEP)

    # The user's own store holds every experiment's run, tagged with its name and baseline commit.
    client = MlflowClient(tracking_uri=f"sqlite:///{repo_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genpipe")
    trained = client.search_runs([experiment.experiment_id], "tags.`genpipe.stage` = 'train_zoo@vae'")
    runs = [r for r in trained if "dvc.experiment" in r.data.tags]  # the baseline's has none
    assert len(trained) == len(SWEEP) + 1 and len(runs) == len(SWEEP)
    by_name = {r.data.tags["dvc.experiment"]: r for r in runs}
    assert set(by_name) == set(SWEEP), [r.data.tags for r in runs]
    assert {r.data.tags["dvc.baseline_rev"] for r in runs} == {baseline}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params[KNOB.replace("train_zoo.vae.", "train_zoo.")] for r in runs} == set(SWEEP.values())
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in trained}
    # Nothing recorded points into a temporary copy: artefacts, sources, checkpoints are the user's.
    records = [experiment.artifact_location, *(r.info.artifact_uri for r in runs)]
    records += [v.source for v in versions] + [t for v in versions for t in v.tags.values()]
    records += [t for r in runs for t in r.data.tags.values()]
    assert not [x for x in records if TEMP_COPY in x], [x for x in records if TEMP_COPY in x]
    assert all(r.info.artifact_uri.startswith((repo_copy / "mlartifacts").as_uri()) for r in runs)
    assert len(list((repo_copy / ".genpipe/ray_results").glob("train_zoo-vae-*"))) == len(SWEEP) + 1

    # `dvc exp show` puts each experiment's knob next to the judge's figures.
    shown = run(["dvc", "exp", "show", "--only-changed", "--drop", ".*/.*", "--csv"], repo_copy).stdout
    rows = {row["Experiment"] or row["rev"]: row for row in csv.DictReader(io.StringIO(shown))}
    assert not [c for c in rows["workspace"] if "/" in c], shown  # the README's view: no training curves
    assert {name: rows[name][KNOB] for name in SWEEP} == SWEEP, shown
    assert all(rows[name]["cond_accuracy"] for name in SWEEP)
    fd = {name: float(rows[name]["fid_over_floor"]) for name in SWEEP}
    best = min(fd, key=fd.get)
    fd[BASELINE] = float(rows["workspace"]["fid_over_floor"])  # the committed baseline, before apply

    # The applied best experiment is what DVC recorded: nothing re-runs but promote (it always runs).
    run(["dvc", "exp", "apply", best], repo_copy)
    assert yaml.safe_load((repo_copy / "params.yaml").read_text())["train_zoo"]["vae"]["loop"]["lr"] == float(
        SWEEP[best]
    )
    plan = run(["dvc", "repro", "--dry"], repo_copy).stdout
    assert [x for x in plan.splitlines() if x.startswith("Running stage")] == ["Running stage 'promote':"]

    # The gate ran in every experiment under one lock: the champion is the best of the sweep.
    champion = client.get_model_version_by_alias(MODEL, "champion")
    won = client.get_run(champion.run_id).data.tags.get("dvc.experiment", BASELINE)
    best = min(fd, key=fd.get)  # the baseline's champion stays where no experiment beats it
    assert won == best, f"champion is {won} ({fd[won]:.4g}), the sweep's best is {best} ({fd[best]:.4g})"
    # The registered versions carry their experiment too, not only their runs.
    tagged = {v.tags.get("dvc.experiment") for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert set(SWEEP) <= tagged, tagged
