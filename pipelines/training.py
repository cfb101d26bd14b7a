"""What every training stage driver does around `fit`: Ray, the resumable run, curves, export."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunTag

from components import catalog
from components.catalog import ModelSpec
from components.evaluation.curves import plot_curves
from components.io import atomic_file, weights_sha256, write_json
from components.registry.registry import log_generator, register_version, registered_name
from components.registry.tracking import STEP_KEY, MlflowSampleSink, MlflowSink
from components.schema import StrictConfig
from components.training.config import LoopConfig, TrainConfig
from components.training.task import Task
from pipelines.bucket import publish_data, use_bucket
from pipelines.lineage import dvc_data_hash, resolve_storage
from pipelines.ray_start import init_ray, joins_local
from pipelines.runtime import StageRun
from pipelines.timing import StageClock

ATTEMPT_KEY = "perf/attempt_start"  # a point per training attempt, when it began: the last step logged before


class AttemptSink(MlflowSink):
    """Rank 0's metric sink; it also marks when each training attempt starts (a restart after a worker
    failure is a new attempt), so the driver can book a failed attempt's training as training."""

    def last_step(self) -> int:
        first = self._last is None  # the loop asks once, right before its first step
        step = super().last_step()
        if first:
            now = int(time.time() * 1000)
            self.client.log_metric(self.run_id, ATTEMPT_KEY, float(step), timestamp=now, step=max(step, 0))
        return step


def failed_attempts(
    tracking_uri: str, run_id: str, *, since: float, until: float
) -> list[tuple[float, float]]:
    """(start, end) of each attempt that began in [since, until): its start mark to its last logged step.

    `until` is when the attempt that finished began. The steps a failed attempt trained after its last
    log (at most `loop.log_every`) stay in `workers`: nothing of a killed worker says when it died.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    history = client.get_metric_history(run_id, ATTEMPT_KEY)
    starts = sorted(t for m in history if since <= (t := m.timestamp / 1000) < until)
    if not starts:
        return []
    logged = [m.timestamp / 1000 for m in client.get_metric_history(run_id, STEP_KEY)]
    ends = [*starts[1:], until]
    return [(a, max((t for t in logged if a <= t < b), default=a)) for a, b in zip(starts, ends, strict=True)]


def code_hash(roots: tuple[Path, ...] | None = None) -> str:
    """sha256 over genpipe's own sources (*.py under `roots`: components/ and pipelines/ as this process
    runs them), names and contents both."""
    if roots is None:
        import components
        import pipelines

        roots = tuple(Path(package.__file__).parent for package in (components, pipelines))
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{root.name}/{path.relative_to(root)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def ray_run_name(
    stage: str, sections: dict[str, StrictConfig], *, data_deps: list[str], label: str | None = None
) -> str:
    """`<label or stage>-<hash>` of the stage's (or variant's) and `train` params, the data and the code.

    Same inputs resume the run's latest checkpoint (a killed stage); anything else starts fresh.
    The code counts too: DVC re-runs a stage when its code changes, and resuming a finished run
    would hand back weights the old code trained.
    """
    blob = json.dumps(
        {
            "stage": sections[stage].model_dump(mode="json"),
            "train": sections["train"].model_dump(mode="json"),
            "data": dvc_data_hash(data_deps),
            "code": code_hash(),
        },
        sort_keys=True,
    )
    return f"{label or stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def ray_lineage(run_name: str, sections: dict[str, StrictConfig]) -> dict[str, str]:
    """The version tags that find a model's Ray run: its name and the storage holding its checkpoints."""
    return {"ray_run_name": run_name, "ray_storage_path": resolve_storage(sections["train"].storage_path)}


def train_on_ray(
    *,
    stage: str,
    sections: dict[str, StrictConfig],
    run: StageRun,
    task_factory: Callable[[], Task],
    loop: LoopConfig,
    data_dir: Path,
    run_name: str,
    reader: str = "images",
    clock: StageClock | None = None,
):
    """Train `task_factory()` on the train and val splits of `data_dir` through Ray Train, logging into `run`.

    `reader` names the data format: "images" (data/processed: image, label) or "tokens" (data/tokens:
    tokens, latent, label), the inputs of the priors and of latent diffusion. `clock` gets the marks.
    """
    from components.data.raydata import training_split
    from components.data.tokens import token_files, token_training_split
    from components.training.ray_adapter import fit

    readers = {"images": training_split, "tokens": token_training_split}
    if reader not in readers:
        raise ValueError(f"unknown reader {reader!r}; valid: {', '.join(readers)}")
    clock = clock or StageClock()  # a stage's own (the CLI's), else one for this call
    storage_path = resolve_storage(sections["train"].storage_path)
    use_bucket(sections, storage_path)  # before Ray starts: a wrong bucket costs no start-up
    clock.mark("ray_start")
    init_ray(sections["ray"])
    check_resources(sections["train"], local=joins_local(sections["ray"]))
    clock.mark("ray")
    shards = {"images": None, "tokens": partial(token_files, data_dir)}[reader]
    published = publish_data(sections, data_dir, shards=shards)
    datasets = {split: readers[reader](data_dir, split, published=published) for split in ("train", "val")}
    clock.mark("data")
    result = fit(
        task_factory=task_factory,
        loop=loop,
        train=sections["train"].model_copy(update={"storage_path": storage_path}),
        run_name=run_name,
        datasets=datasets,
        sink_factory=partial(AttemptSink, run.tracking_uri, run.run_id),
        sample_sink_factory=partial(MlflowSampleSink, run.tracking_uri, run.run_id, stage),
        owned_instance=joins_local(sections["ray"]),
    )
    clock.mark("fit")
    clock.marks.update(result.clock)
    if "worker" in result.clock:  # the attempt that finished began there; any before it failed
        try:
            clock.retried = failed_attempts(
                run.tracking_uri, run.run_id, since=clock.marks["data"], until=result.clock["worker"]
            )
        except Exception as err:  # noqa: BLE001 - only the timing line depends on it
            print(f"{stage}: note: failed attempts not timed ({err})", file=sys.stderr)
    if result.resumed_from:
        print(f"{stage}: resumed run {run_name} from step {result.resumed_from}")
    tag_worker_nodes(run, result.nodes)
    return result


NODES_TAG, NUM_NODES_TAG = "ray.worker_nodes", "ray.num_nodes"


def tag_worker_nodes(run: StageRun, nodes: tuple[str, ...]) -> dict[str, dict]:
    """Tag the run with the Ray nodes its workers ran on: `{node id: {"ip", "ranks"}}` as JSON."""
    import ray

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    placed: dict[str, dict] = {}
    for rank, node in enumerate(nodes):
        placed.setdefault(node, {"ip": ips.get(node, "?"), "ranks": []})["ranks"].append(rank)
    if not placed:  # a result that names no nodes: nothing to say
        return placed
    client = MlflowClient(tracking_uri=run.tracking_uri)
    value = json.dumps(placed)
    if len(value) > 8000:  # MLflow's limit on a tag value: some 90 nodes
        client.log_dict(run.run_id, placed, "ray_nodes.json")
        value = "too long for a tag: see the artifact ray_nodes.json"
    client.log_batch(run.run_id, tags=[RunTag(NUM_NODES_TAG, str(len(placed))), RunTag(NODES_TAG, value)])
    if len(placed) > 1:
        hosts = ", ".join(f"{v['ip']} ({len(v['ranks'])})" for v in placed.values())
        print(f"{run.stage}: {len(nodes)} workers on {len(placed)} nodes, workers per node: {hosts}")
    return placed


def check_resources(train: TrainConfig, *, local: bool) -> None:
    """Fail fast where Ray Train would wait for ever: a local instance short of the CPUs or GPUs asked for.

    A joined cluster may grow (the autoscaler adds GPU nodes on demand): there it is only a note.
    """
    import ray

    have = ray.cluster_resources()
    need = {"CPU": ("cpus_per_worker", train.num_workers * train.cpus_per_worker)}
    if train.use_gpu:
        need["GPU"] = ("gpus_per_worker", train.num_workers * train.gpus_per_worker)
    for kind, (per_worker, n) in need.items():
        if have.get(kind, 0.0) >= n:
            continue
        what = (
            f"train.num_workers={train.num_workers} x train.{per_worker}={getattr(train, per_worker):g} "
            f"needs {n:g} {kind}s and the Ray cluster has {have.get(kind, 0.0):g}"
        )
        if not local:
            print(f"note: {what}; Ray Train waits until the autoscaler adds them")
        elif kind == "GPU":
            raise ValueError(f"{what}: set train.use_gpu=false, or join a GPU cluster with RAY_ADDRESS")
        else:
            raise ValueError(
                f"{what}: lower train.num_workers or train.cpus_per_worker, or raise ray.num_cpus"
            )


def write_curves(run: StageRun, path: Path) -> dict[int, dict[str, float]]:
    """Every per-step metric of the run as one CSV (`step` + one column per metric) for dvc plots."""
    client = MlflowClient(tracking_uri=run.tracking_uri)
    # final/* are logged once after training (no step); train/step only marks which steps were logged,
    # perf/attempt_start when each training attempt began.
    keys = sorted(
        k
        for k in client.get_run(run.run_id).data.metrics
        if not k.startswith("final/") and k not in (STEP_KEY, ATTEMPT_KEY)
    )
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run.run_id, key):
            rows.setdefault(int(m.step), {})[key] = m.value
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *keys])
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow({"step": step, **rows[step]})
    return rows


def finish(
    run: StageRun,
    *,
    family: str,
    model_dir: Path,
    metrics: dict[str, float],
    metrics_path: Path,
    curves_path: Path,
    register_model: bool,
    tags: dict[str, str] | None = None,
    registered: str | None = None,
) -> str | None:
    """A training stage's last steps: metrics JSON, final metrics and curves, model logged and registered.

    A generator (`family` is a models/ folder of components.generators.MODELS) is logged as a pyfunc
    model from code and registered from it; the evaluator and the tokenizer as a plain folder.
    """
    from components.generators import MODELS

    write_json(metrics_path, metrics)
    run.log_metrics({f"final/{k}": v for k, v in metrics.items()})
    rows = write_curves(run, curves_path)
    plot_curves(rows, curves_path.with_suffix(".png"), title=f"{family}: training curves")
    run.log_artifact(curves_path.with_suffix(".png"), "plots")
    logged = None
    if family in MODELS:
        logged = log_generator(tracking_uri=run.tracking_uri, run_id=run.run_id, model_dir=model_dir)
        print(f"{run.stage}: logged pyfunc model {logged.model_id} in {logged.seconds:.2f} s")
    else:
        run.log_artifacts(model_dir, "model")
    if not register_model:
        return None
    sha = weights_sha256(model_dir)
    tags = {
        **run.tags,
        **(tags or {}),
        "model_sha256": sha,
        **(logged.tags if logged else {}),
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    name = registered or registered_name(family)
    version = register_version(
        tracking_uri=run.tracking_uri,
        name=name,
        run_id=run.run_id,
        tags=tags,
        **({"model_id": logged.model_id} if logged else {"artifact_path": "model"}),
    )
    print(f"registered {name} version {version}")
    return version


def variant_sections(
    sections: dict[str, StrictConfig], spec: ModelSpec
) -> tuple[StrictConfig, dict[str, StrictConfig]]:
    """The variant's own config, and the sections with the stage's entry narrowed to it.

    Run names, params hashes and logged params then depend on this variant alone, so changing
    `latent` never restarts `pixel`.
    """
    cfg = getattr(sections[spec.stage], spec.variant, None)
    if cfg is None:
        valid = ", ".join(type(sections[spec.stage]).model_fields)
        raise ValueError(f"unknown {spec.stage} variant {spec.variant!r}; valid: {valid}")
    return cfg, {**sections, spec.stage: cfg}


def train_model(
    spec: ModelSpec,
    sections: dict[str, StrictConfig],
    *,
    task_factory: Callable[[], Task],
    loop: LoopConfig,
    export: Callable[[object, Path], dict[str, float]],
    tags: dict[str, str] | None = None,
    artifacts: tuple[Path, ...] = (),
    clock: StageClock | None = None,
) -> dict[str, float]:
    """Train through Ray, export `models/<name>` with `export(fit_result, folder)`, log, register.

    The skeleton all 11 training stages share (catalog.MODELS): a stage module adds only its
    config, task and export. Training metrics go to `reports/train_<name>.json`, with `artifacts`
    (files `export` wrote, e.g. a reconstruction grid) logged into the run; the evaluate stage
    judges a generator's samples.
    """
    from pipelines.estimate import estimate_lines
    from pipelines.lineage import repo_root
    from pipelines.runtime import stage_run

    clock = clock or StageClock()  # the CLI's, counting from the process start; else from now
    root = repo_root()
    data_deps = [spec.data, *spec.inputs]
    label = spec.command  # `train_zoo@vae`, or the stage itself
    run_name = ray_run_name(spec.stage, sections, data_deps=data_deps, label=label.replace("@", "-"))
    for line in estimate_lines(
        spec, sections, loop=loop, task_factory=task_factory, data_dir=root / spec.data
    ):
        print(line, flush=True)  # what it will cost, before it starts (pipelines/estimate.py)
    with stage_run(label, sections, data_deps=data_deps, resume_key=run_name) as run:
        result = train_on_ray(
            stage=label,
            sections=sections,
            run=run,
            task_factory=task_factory,
            loop=loop,
            data_dir=root / spec.data,
            run_name=run_name,
            reader="tokens" if spec.data == catalog.TOKENS else "images",
            clock=clock,
        )
        metrics = export(result, root / spec.folder)
        for path in artifacts:
            run.log_artifact(path)
        if (seconds := clock.training_seconds()) is not None:  # first step to last: no start-up
            metrics["train_seconds"] = seconds
        finish(
            run,
            family=spec.name,
            model_dir=root / spec.folder,
            metrics=metrics,
            metrics_path=root / "reports" / f"train_{spec.name}.json",
            curves_path=root / "reports" / "plots" / f"train_{spec.name}.csv",
            register_model=sections["mlflow"].register_models,
            tags={**(tags or {}), **ray_lineage(run_name, sections)},
            registered=spec.registered,
        )
    print(clock.line(label))
    return metrics
