"""End to end: `dvc repro` in a fresh git repo holding this project, as a user runs it.

One tiny pipeline is reproduced once (the module's fixture) and serves, in this order: the checks of
what `genpipe repro` did, a queued sweep of experiments on top of it, and a fresh store beside its
outputs. Each is the suite's most expensive kind of work, so they share the reproduction.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from components import catalog
from pipelines.lineage import DVC_TEMP_COPIES
from tests.conftest import copy_repo, run

pytestmark = pytest.mark.slow


def _set(params: Path, section: str, **values) -> None:
    raw = yaml.safe_load(params.read_text())
    raw[section].update(values)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def _set_nested(params: Path, *keys: str, **values) -> None:
    raw = yaml.safe_load(params.read_text())
    node = raw
    for key in keys:
        node = node[key]
    node.update(values)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


#: The variants the end-to-end run keeps: the pixel and the two-stage latent path (tokenizer, encode),
#: and one likelihood family, the sweep's. Every family's stage runs on real Ray and MLflow in
#: tests/pipelines/test_stages.py; here the whole DAG's wiring is checked by DVC's graph and a narrower
#: DAG really runs.
E2E_MODELS = ("diffusion_pixel", "diffusion_latent", "vae")
VARIANT_MODEL = {
    "train_diffusion": "diffusion_{}",
    "train_prior": "prior_{}",
    "train_zoo": "{}",
    "evaluate": "{}",
}


def _variants(repo: Path, stage: str, pattern: str) -> dict[str, str]:
    """{model: "<stage>@<variant>"} of one foreach stage in dvc.yaml."""
    each = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["foreach"]
    return {pattern.format(v): f"{stage}@{v}" for v in each}


def _narrow_dag(repo: Path, keep: tuple[str, ...]) -> list[str]:
    """Drop the generator variants not in `keep` from dvc.yaml; returns the dropped models."""
    path = repo / "dvc.yaml"
    raw = yaml.safe_load(path.read_text())
    stages, dropped = raw["stages"], []
    for stage, pattern in VARIANT_MODEL.items():
        each = stages[stage]["foreach"]
        names = list(each)
        gone = [v for v in names if pattern.format(v) not in keep]
        dropped += [pattern.format(v) for v in gone if stage == "evaluate"]
        stages[stage]["foreach"] = (
            {k: v for k, v in each.items() if k not in gone}
            if isinstance(each, dict)
            else [v for v in each if v not in gone]
        )
    drop = {f"reports/evaluate/{m}.json" for m in dropped} | {f"reports/train_{m}.json" for m in dropped}
    for stage in ("report", "promote"):
        stages[stage]["deps"] = [d for d in stages[stage]["deps"] if d not in drop]
    stages["promote"]["cmd"] = " ".join(w for w in stages["promote"]["cmd"].split() if w not in dropped)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dropped


def test_repro_runs_noops_and_reruns_on_param_change(repo_copy: Path):
    out = run(["dvc", "repro", "prepare"], repo_copy).stdout
    assert "Running stage 'prepare'" in out
    metrics = json.loads((repo_copy / "reports/prepare.json").read_text())
    assert metrics["num_classes"] == 10.0
    assert metrics["num_train"] + metrics["num_val"] + metrics["num_test"] == 1797
    meta = json.loads((repo_copy / "data/processed/meta.json").read_text())
    assert meta["image_size"] == 16 and meta["channels"] == 1
    assert (repo_copy / "reports/prepare_samples.png").stat().st_size > 0
    assert (repo_copy / "mlflow.db").is_file()

    again = run(["dvc", "repro", "prepare"], repo_copy).stdout
    assert "Running stage" not in again

    _set(repo_copy / "params.yaml", "prepare", image_size=12)
    rerun = run(["dvc", "repro", "prepare"], repo_copy).stdout
    assert "Running stage 'prepare'" in rerun
    assert json.loads((repo_copy / "data/processed/meta.json").read_text())["image_size"] == 12

    shown = run(["dvc", "metrics", "show", "--json"], repo_copy).stdout
    assert "num_train" in shown

    # The default remote (a folder beside the repo) works out of the box.
    run(["dvc", "push", "prepare"], repo_copy)
    assert any((repo_copy.parent / "genpipe-dvc-remote").rglob("*")), "dvc push wrote nothing"
    shutil.rmtree(repo_copy / "data/processed")
    shutil.rmtree(repo_copy / ".dvc/cache")
    run(["dvc", "pull", "prepare"], repo_copy)
    assert json.loads((repo_copy / "data/processed/meta.json").read_text())["image_size"] == 12
    assert "Running stage" not in run(["dvc", "repro", "prepare"], repo_copy).stdout


def _tiny_params(repo: Path) -> None:
    from tests.pipelines.test_stages import TINY

    params = repo / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    for section, value in TINY.items():
        if section not in ("train", "ray", "prepare"):
            raw[section] = value
    raw["ray"]["num_cpus"] = 2
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_dag_wires_every_model(repo_copy: Path):
    """DVC's own graph of the shipped dvc.yaml: each model trained, judged, reported, promoted."""
    every_model = [m.name for m in catalog.GENERATORS]
    dot = run(["dvc", "dag", "--dot"], repo_copy).stdout
    edges = {
        tuple(e.strip().strip(";").replace('"', "").split(" -> ")) for e in dot.splitlines() if "->" in e
    }
    trained = {}
    for stage, pattern in VARIANT_MODEL.items():
        if stage != "evaluate":
            trained |= _variants(repo_copy, stage, pattern)
    assert set(trained) == set(every_model)
    for model, stage in trained.items():
        judged = f"evaluate@{model}"
        assert {
            (stage, judged),
            ("train_evaluator", judged),
            (judged, "report"),
            (judged, "promote"),
        } <= edges, model
    assert {("train_tokenizer", "train_prior@maskgit"), ("encode", "train_diffusion@latent")} <= edges
    dropped = _narrow_dag(repo_copy, E2E_MODELS)
    assert dropped == [m for m in every_model if m not in E2E_MODELS]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> tuple[Path, str]:
    """A clone on tiny params with the narrower DAG, reproduced by `genpipe repro` as `make run` does
    (one local Ray every stage joins) and committed: (repo, what `genpipe repro` printed)."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    _tiny_params(repo)
    _narrow_dag(repo, E2E_MODELS)
    run(["git", "commit", "-qam", "tiny params, narrower DAG"], repo)
    out = run(["genpipe", "repro"], repo).stdout
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    return repo, out


@pytest.mark.timeout(1800)  # six training stages and three judges, each its own process
def test_full_pipeline_with_tiny_params(tiny_pipeline: tuple[Path, str]):
    """The narrower DAG runs, re-runs nothing, one knob re-runs what depends on it."""
    repo_copy, out = tiny_pipeline
    params = repo_copy / "params.yaml"
    assert "stages share the local Ray instance at" in out
    noise = (
        "Failed to query Ray Train Controller actor state",  # PlacementGroupCleaner vs minimal dashboard
        "Token authentication is enabled",
        "Progress bars disabled",
        "execution finished in",  # Ray Data, a line per dataset
        "exclude_resources` is deprecated",
        "non-writable tensors",
        "core_worker",  # e.g. the encode actors' "constructor arguments in the object store" error
        "Downloading artifacts",  # MLflow's tqdm bar per artefact copy when a model is logged
        "Connecting to existing Ray cluster",  # a stage joining `genpipe repro`'s instance
        "is deprecated",
    )
    assert not [n for n in noise if n in out], [n for n in noise if n in out]
    stages = ["prepare", "train_evaluator", "train_tokenizer", "encode", "report", "promote"]
    stages += ["train_diffusion@pixel", "train_diffusion@latent", "train_zoo@vae"]
    stages += [f"evaluate@{m}" for m in E2E_MODELS]
    for stage in stages:
        assert f"Running stage '{stage}'" in out, stage
    assert "Running stage 'train_zoo@gan'" not in out and "evaluate@prior_gpt" not in out
    # The summary: one row per stage; a training stage's row splits its wall time (its timing line).
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(stages) <= set(rows) and "**total**" in rows
    training, overhead = (float(x) for x in rows["train_zoo@vae"].split("|")[3:5])
    assert training > 0 and overhead > 0
    assert "cond. acc" in rows["evaluate@vae"]
    assert json.loads((repo_copy / "reports/train_evaluator.json").read_text())["test_accuracy"] > 0.3
    tokenizer = json.loads((repo_copy / "reports/train_tokenizer.json").read_text())
    assert 0 < tokenizer["codebook_usage"] <= 1
    assert json.loads((repo_copy / "data/tokens/meta.json").read_text())["grid"] == [4, 4]
    models = run(["genpipe", "models"], repo_copy).stdout
    assert "genpipe-evaluator" in models and "genpipe-tokenizer" in models

    summary = json.loads((repo_copy / "reports/evaluate.json").read_text())
    assert set(summary) == {"genpipe-diffusion", "genpipe-latent-diffusion", "genpipe-vae"}

    # Every evaluated generator ends as its model's champion (the first one: no champion to beat).
    promoted = json.loads((repo_copy / "reports/promote.json").read_text())
    assert set(summary) <= set(promoted)
    assert all(entry["decision"] == "promoted" for entry in promoted.values()), promoted
    assert "champion" in run(["genpipe", "models"], repo_copy).stdout

    again = run(["dvc", "repro"], repo_copy).stdout  # only promote, which always runs (dvc.yaml)
    assert [x for x in again.splitlines() if x.startswith("Running stage")] == ["Running stage 'promote':"]
    # What each knob re-runs, from DVC's own plan (`--dry`: the real re-run of a changed stage is
    # covered above on `prepare`; here the question is which stages a knob reaches).
    _set(params, "evaluate", seed=1)
    plan = run(["dvc", "repro", "--dry"], repo_copy).stdout
    assert all(f"Running stage 'evaluate@{m}'" in plan for m in E2E_MODELS)
    assert "Running stage 'train_" not in plan
    run(["git", "checkout", "params.yaml"], repo_copy)
    # One variant's knob re-runs that variant only.
    _set_nested(params, "train_diffusion", "latent", "loop", steps=10)
    plan = run(["dvc", "repro", "--dry"], repo_copy).stdout
    assert "Running stage 'train_diffusion@latent'" in plan
    assert "Running stage 'train_diffusion@pixel'" not in plan
    assert "Running stage 'evaluate@diffusion_pixel'" not in plan
    run(["git", "checkout", "params.yaml"], repo_copy)
    _set(params, "encode", batch_size=64)
    plan = run(["dvc", "repro", "--dry"], repo_copy).stdout
    assert "Running stage 'encode'" in plan and "Running stage 'train_tokenizer'" not in plan
    shown = run(["dvc", "metrics", "show"], repo_copy).stdout
    assert "reports/train_tokenizer.json" in shown and "reports/evaluate.json" in shown

    run(["git", "checkout", "params.yaml"], repo_copy)


#: The sweep: queued experiments of one knob, run two at a time on one Ray, as README "Sweeps" shows
KNOB = "train_zoo.vae.loop.lr"
SWEEP = {"sweep-1": "0.001", "sweep-2": "0.008"}  # experiment name -> knob value
SWEPT = "genpipe-vae"
BASELINE = "baseline"
TEMP_COPY = DVC_TEMP_COPIES.as_posix()  # where DVC runs a queued experiment: must appear in no record


@pytest.mark.timeout(1800)
def test_a_queued_sweep_records_where_the_user_looks(tiny_pipeline: tuple[Path, str]):
    """Each experiment runs in DVC's temporary copy and records into the user's MLflow store; the
    sweep's best ends as champion."""
    repo, _ = tiny_pipeline
    run(["git", "checkout", "--", "."], repo)  # the committed baseline, whatever ran before
    baseline = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genpipe")
    stage_runs = "tags.`genpipe.stage` = 'train_zoo@vae'"
    before = {r.info.run_id for r in client.search_runs([experiment.experiment_id], stage_runs)}
    for name, value in SWEEP.items():  # each re-runs train_zoo@vae, evaluate@vae, report and promote
        run(["genpipe", "exp", "run", "--queue", "-n", name, "-S", f"{KNOB}={value}"], repo)
    started = time.perf_counter()
    try:
        proc = run(["genpipe", "exp", "run", "--run-all", "-j", "2"], repo, check=False)
    finally:
        run(["dvc", "queue", "stop", "--kill"], repo, check=False)
    print(f"sweep of {len(SWEEP)} experiments, 2 at a time: {time.perf_counter() - started:.1f} s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    status = run(["dvc", "queue", "status"], repo).stdout
    assert all(f"{name}" in status for name in SWEEP) and status.count("Success") == len(SWEEP), status
    assert "database is locked" not in out
    # One Ray for all: `genpipe exp run --run-all` started it, the experiments' stages joined it.
    assert out.count("Started a local Ray instance") == 1, out[-4000:]
    assert out.count("Running stage 'train_zoo@vae'") == len(SWEEP)

    # The user's own store holds every experiment's run, tagged with its name and baseline commit.
    trained = client.search_runs([experiment.experiment_id], stage_runs)
    runs = [r for r in trained if r.info.run_id not in before]
    assert len(runs) == len(SWEEP) and not [
        r for r in trained if r.info.run_id in before and "dvc.experiment" in r.data.tags
    ]
    by_name = {r.data.tags.get("dvc.experiment"): r for r in runs}
    assert set(by_name) == set(SWEEP), [r.data.tags for r in runs]
    assert {r.data.tags["dvc.baseline_rev"] for r in runs} == {baseline}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params[KNOB.replace("train_zoo.vae.", "train_zoo.")] for r in runs} == set(SWEEP.values())
    versions = client.search_model_versions(f"name='{SWEPT}'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in trained}
    # Nothing recorded points into a temporary copy: artefacts, sources, checkpoints are the user's.
    records = [experiment.artifact_location, *(r.info.artifact_uri for r in runs)]
    records += [v.source for v in versions] + [t for v in versions for t in v.tags.values()]
    records += [t for r in runs for t in r.data.tags.values()]
    assert not [x for x in records if TEMP_COPY in x], [x for x in records if TEMP_COPY in x]
    assert all(r.info.artifact_uri.startswith((repo / "mlartifacts").as_uri()) for r in runs)
    assert len(list((repo / ".genpipe/ray_results").glob("train_zoo-vae-*"))) == len(SWEEP) + 1

    # `dvc exp show` puts each experiment's knob next to the judge's figures.
    shown = run(["dvc", "exp", "show", "--only-changed", "--drop", ".*/.*", "--csv"], repo).stdout
    rows = {row["Experiment"] or row["rev"]: row for row in csv.DictReader(io.StringIO(shown))}
    assert not [c for c in rows["workspace"] if "/" in c], shown  # the README's view: no training curves
    assert {name: rows[name][KNOB] for name in SWEEP} == SWEEP, shown
    # Several judged models: each report's keys collide, so the summary's (`<model>.<figure>`) show.
    assert all(rows[name][f"{SWEPT}.cond_accuracy"] for name in SWEEP)
    fd = {name: float(rows[name][f"{SWEPT}.fid_over_floor"]) for name in SWEEP}
    best = min(fd, key=fd.get)
    fd[BASELINE] = float(rows["workspace"][f"{SWEPT}.fid_over_floor"])  # the baseline, before apply

    # The applied best experiment is what DVC recorded: nothing re-runs but promote (it always runs).
    run(["dvc", "exp", "apply", best], repo)
    applied = yaml.safe_load((repo / "params.yaml").read_text())["train_zoo"]["vae"]["loop"]["lr"]
    assert applied == float(SWEEP[best])
    plan = run(["dvc", "repro", "--dry"], repo).stdout
    assert [x for x in plan.splitlines() if x.startswith("Running stage")] == ["Running stage 'promote':"]

    # The gate ran in every experiment under one lock: the champion is the best of the sweep.
    champion = client.get_model_version_by_alias(SWEPT, "champion")
    won = client.get_run(champion.run_id).data.tags.get("dvc.experiment", BASELINE)
    best = min(fd, key=fd.get)  # the baseline's champion stays where no experiment beats it
    assert won == best, f"champion is {won} ({fd[won]:.4g}), the sweep's best is {best} ({fd[best]:.4g})"
    # The registered versions carry their experiment too, not only their runs.
    tagged = {v.tags.get("dvc.experiment") for v in client.search_model_versions(f"name = '{SWEPT}'")}
    assert set(SWEEP) <= tagged, tagged
    # Back to the committed baseline for what follows.
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "checkout", "--force"], repo)


def test_a_fresh_store_records_the_report_on_the_new_version(tiny_pipeline: tuple[Path, str]):
    """A fresh store beside the same outputs (a new clone retrains the committed weights, and DVC
    skips the unchanged judges): promote records the up-to-date report on the new version."""
    repo, _ = tiny_pipeline
    run(["git", "checkout", "--", "."], repo)
    for store in (
        "mlflow.db",
        "mlflow.db-wal",
        "mlflow.db-shm",
    ):  # the store and its WAL (pipelines/runtime.py)
        (repo / store).unlink(missing_ok=True)
    run(["genpipe", "train_zoo", "vae"], repo)  # the finished Ray run: same weights, registered anew
    assert "up to date" in run(["dvc", "status", "evaluate@vae"], repo).stdout
    promoted = run(["genpipe", "promote", "vae"], repo).stdout
    assert "genpipe-vae: champion is v1" in promoted, promoted
    lineage = run(["genpipe", "models", "--lineage", "vae@champion"], repo).stdout
    assert "eval.evaluator_sha256: -" not in lineage and "model_sha256: -" not in lineage
