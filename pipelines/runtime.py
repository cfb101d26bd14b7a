"""What every stage driver shares: Ray start-up, the MLflow run, lineage tags, error exits.

Side effects live here and in the stage modules, never in components/.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.config import MlflowConfig, RayConfig
from components.schema import StrictConfig
from pipelines.timing import CLOCK, StageClock, reset_clock  # noqa: F401 - the stages import them from here

ROOT_ENV = "GENPIPE_ROOT"


def repo_root() -> Path:
    """Stages run from the repo root (as DVC runs them); GENPIPE_ROOT overrides."""
    return Path(os.environ.get(ROOT_ENV, os.getcwd())).resolve()


def absolute(path: str | Path) -> str:
    """An absolute path (workers change directory); URIs such as s3:// pass through."""
    s = str(path)
    if "://" in s:
        return s
    p = Path(s).expanduser()
    return str(p if p.is_absolute() else repo_root() / p)


def params_hash(sections: dict[str, StrictConfig]) -> str:
    """sha256 over the resolved sections, stable across key order."""
    blob = json.dumps({k: v.model_dump(mode="json") for k, v in sorted(sections.items())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


#: What a stage's result depends on besides its data: the code and the stage definitions and params.
#: The stages' own tracked outputs (dvc.lock, reports/, data/ and models/ pointers) are not in it.
CODE_PATHS = ("components", "pipelines", "params.yaml", "dvc.yaml", "pyproject.toml")


def git_commit(paths: tuple[str, ...] = CODE_PATHS) -> str:
    """HEAD's sha, with `-dirty` when a file under `paths` differs from it (untracked .py files too)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10
        )
        sha = out.stdout.strip()
        return f"{sha}{'-dirty' if sha and code_dirty(paths) else ''}" if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_dirty(paths: tuple[str, ...] = CODE_PATHS) -> bool:
    """Whether a tracked file under `paths` is modified, or an unignored file there is untracked."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return any(line.strip() for line in status.splitlines())


def dvc_data_hash(deps: list[str]) -> str:
    """DVC's recorded md5 of each data dep (from dvc.lock outs of the stages that made them)."""
    if not deps:
        return ""
    lock = repo_root() / "dvc.lock"
    found = _dvc_outs(lock, lock.stat().st_mtime_ns) if lock.is_file() else {}
    return ",".join(f"{d}:{found.get(d, 'untracked')}" for d in deps)


@functools.lru_cache(maxsize=4)
def _dvc_outs(lock: Path, mtime_ns: int) -> dict[str, str]:
    """{out path: md5} of every stage in dvc.lock; parsed once per version of the file (a stage asks thrice)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 5x faster on a 50 kB lock file
    stages = (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {})
    outs = (out for stage in stages.values() for out in stage.get("outs", []))
    return {out["path"]: out.get("md5", "") for out in outs if "path" in out}


# --- Ray --------------------------------------------------------------------------------------
def joins_cluster(cfg: RayConfig) -> str | None:
    """The address of the Ray cluster to join (RAY_ADDRESS, else `ray.address`); None: a local instance."""
    return os.environ.get("RAY_ADDRESS") or cfg.address


SHARED_LOCAL_ENV = "GENPIPE_LOCAL_RAY"  # `genpipe repro` sets it to the address of its own local instance


def joins_local(cfg: RayConfig) -> bool:
    """True when the instance is this machine's own: a new one, or the one `genpipe repro` shares."""
    address = joins_cluster(cfg)
    return address is None or address == os.environ.get(SHARED_LOCAL_ENV)


# A local instance: the Train controller polls its workers every 0.25 s instead of 2 s (fit() returns
# ~2 polls after the last step), and skips the cloud-only preemption watcher and metrics exporter:
# each is a process importing ray for 1-3 s on a small machine. A joined cluster keeps its settings.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


#: MLflow's notes while it creates a fresh store's tables (a first run): {logger: level raised to}
QUIET_MLFLOW = {"mlflow.store.db.utils": logging.WARNING, "alembic.runtime.migration": logging.WARNING}


def quiet_ray_logs() -> None:
    """Ray's noise off in this process; also each Ray worker's setup hook (`worker_process_setup_hook`)."""
    from components.training import ray_trims

    ray_trims.quiet_logs()  # Ray-internal loggers: named in the one module that may name them
    # Ray Data's DatasetManager (a split dataset) passes an option Ray Data itself deprecated
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions.exclude_resources. is deprecated")


QUIET_RUNTIME_ENV = {"worker_process_setup_hook": "pipelines.runtime.quiet_ray_logs"}


def init_ray(cfg: RayConfig) -> None:
    """Join RAY_ADDRESS (or `ray.address`), else start a local instance with explicit resources."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each worker line prints twice
    _quiet_ray_data()
    quiet_ray_logs()
    address = joins_cluster(cfg)
    if address:
        shared = address == os.environ.get(SHARED_LOCAL_ENV)  # `genpipe repro`'s: no "Connecting to" lines
        ray.init(
            address=address,
            log_to_driver=True,
            runtime_env=QUIET_RUNTIME_ENV,
            **({"logging_level": logging.WARNING} if shared else {}),
        )
        return
    for key, value in LOCAL_RAY_ENV.items():  # inherited by every process of the instance started here
        os.environ.setdefault(key, value)
    ray.init(
        address="local",  # a new instance: never the one a user's `ray start` left on this machine
        num_cpus=cfg.num_cpus or os.cpu_count(),
        num_gpus=cfg.num_gpus,
        include_dashboard=cfg.include_dashboard,
        log_to_driver=True,
        runtime_env=QUIET_RUNTIME_ENV,
    )


def _quiet_ray_data() -> None:
    """Ray Data's per-dataset progress bars drown the training progress lines; keep the latter."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# --- MLflow -----------------------------------------------------------------------------------
def tracking_uri(cfg: MlflowConfig) -> str:
    """MLFLOW_TRACKING_URI, else `mlflow.tracking_uri`, else the repo's sqlite file."""
    for name, level in QUIET_MLFLOW.items():  # every command finds its store here: quiet from here on
        logging.getLogger(name).setLevel(level)
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{repo_root() / 'mlflow.db'}"
    )


@dataclass
class StageRun:
    """The stage's MLflow run, opened by the driver; workers log into it by id."""

    stage: str
    run_id: str
    tracking_uri: str
    tags: dict[str, str]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        for k, v in metrics.items():
            client.log_metric(self.run_id, k, float(v), step=step or 0)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in _flatten(params).items()]
        client = MlflowClient(tracking_uri=self.tracking_uri)
        for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
            client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=self.tracking_uri).log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str) -> None:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=self.tracking_uri).log_artifacts(self.run_id, str(path), artifact_path)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]
    return out


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces), not its runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        # A local store keeps artefacts beside it in the repo; a server keeps its own artifact root
        # (a bucket on a cluster), which an explicit location here would override.
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        artifacts = (repo_root() / "mlartifacts").as_uri() if local else None
        return client.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def _log_data_inputs(client, run_id: str, deps: list[str]) -> None:
    """Each data input as an MLflow dataset input (the runs table's Dataset column), DVC md5 as digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digests = dict(item.split(":", 1) for item in dvc_data_hash(deps).split(",") if item)
    inputs = [
        DatasetInput(
            Dataset(
                name=dep, digest=digests.get(dep, "untracked")[:36], source_type="local", source=absolute(dep)
            ),
            tags=[InputTag("mlflow.data.context", "training")],
        )
        for dep in deps
    ]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


RESUME_TAG = "genpipe.resume_key"


def _resumable_run(client, experiment_id: str, resume_key: str):
    """The latest unfinished run of this key (its driver was killed or failed), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RESUME_TAG}` = '{resume_key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


@contextmanager
def stage_run(
    stage: str, sections: dict[str, StrictConfig], *, data_deps: list[str] = (), resume_key: str | None = None
) -> Iterator[StageRun]:
    """Open one MLflow run for this stage execution, tagged with its lineage; close it on exit.

    With `resume_key` (a training stage's Ray run name), an unfinished run of the same key is
    continued instead: a re-run after a killed driver resumes both the training and its run, so
    neither the run nor its curves are duplicated.
    """
    from mlflow import MlflowClient

    # MLflow's tqdm bar per artefact copy ("Downloading artifacts" x5 when a model is logged)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg: MlflowConfig = sections["mlflow"]
    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    tags = {
        "genpipe.stage": stage,
        "git_commit": git_commit(),
        "params_hash": params_hash(sections),
        "dvc_data_hash": dvc_data_hash(list(data_deps)),
    }
    if resume_key:
        tags[RESUME_TAG] = resume_key
    experiment_id = _experiment_id(client, cfg.experiment, uri)
    previous = _resumable_run(client, experiment_id, resume_key) if resume_key else None
    if previous is not None:
        run_id = previous.info.run_id
        client.update_run(run_id, status="RUNNING")
        print(f"{stage}: continuing MLflow run {run_id} (its driver stopped before finishing)")
    else:
        run_id = client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
    handle = StageRun(stage=stage, run_id=run_id, tracking_uri=uri, tags=tags)
    try:
        if previous is None:
            handle.log_params({k: v.model_dump(mode="json") for k, v in sections.items()})
            _log_data_inputs(client, run_id, list(data_deps))
        yield handle
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def print_config(sections: dict[str, StrictConfig]) -> None:
    """`--dry-run`: the resolved config of every section the stage reads, as YAML."""
    print(yaml.safe_dump({k: v.model_dump(mode="json") for k, v in sections.items()}, sort_keys=False))


# --- exits ------------------------------------------------------------------------------------
def fail(message: str) -> None:
    """One line on stderr, exit status 1."""
    print(f"genpipe: error: {message}", file=sys.stderr)
    raise SystemExit(1)
