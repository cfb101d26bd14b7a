"""What every stage driver shares: the MLflow run, the resolved config, error exits.

Side effects live here and in the stage modules, never in components/. Paths and lineage tags are
pipelines/lineage.py, Ray start-up pipelines/ray_start.py, the timing line pipelines/timing.py.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.config import MlflowConfig, flatten
from components.schema import StrictConfig
from pipelines.lineage import absolute, dvc_data_hash, experiment_tags, git_commit, params_hash, user_root

#: MLflow's notes while it creates a fresh store's tables (a first run): {logger: level raised to}
QUIET_MLFLOW = {"mlflow.store.db.utils": logging.WARNING, "alembic.runtime.migration": logging.WARNING}


# --- MLflow -----------------------------------------------------------------------------------
def tracking_uri(cfg: MlflowConfig) -> str:
    """MLFLOW_TRACKING_URI, else `mlflow.tracking_uri`, else the user's repository's sqlite file
    (that of the repository a DVC experiment's temporary copy was made from: lineage.user_root)."""
    for name, level in QUIET_MLFLOW.items():  # every command finds its store here: quiet from here on
        logging.getLogger(name).setLevel(level)
    uri = (
        os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{user_root() / 'mlflow.db'}"
    )
    if uri.startswith("sqlite:"):
        check_sqlite_leftovers(uri)
        safe_sqlite()
    return uri


def check_sqlite_leftovers(uri: str) -> None:
    """A sqlite store whose file is gone while its write-ahead log remains (`rm mlflow.db` with
    mlflow.db-wal beside it): a process that still holds the old store (`mlflow ui`, a stage) keeps
    writing that log, which a new file beside it shares ("disk I/O error"). One line, nothing opened."""
    from components.registry.locks import local_store_path

    path = local_store_path(uri)
    if path is None or path.exists():
        return
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        raise FileNotFoundError(
            f"{path} is missing but its log {wal.name} remains: stop anything still using the old store "
            f"(mlflow ui, a running stage), then remove {wal.name} and {path.name}-shm for a fresh store"
        )


#: How long a new sqlite connection waits for another process's write before "database is locked".
#: MLflow's sessions set 20 s themselves; this covers what runs outside them (creating the tables,
#: inspecting the engine), where pysqlite's default is 5 s.
SQLITE_BUSY_TIMEOUT_MS = 120_000
_sqlite_hooked = False


def safe_sqlite() -> None:
    """Every sqlite connection this process opens from now on (MLflow's SQLAlchemy engines) uses WAL,
    where readers (a search, `mlflow ui`) and the one writer do not block each other, and waits for
    other writers: concurrent stages (a sweep's experiments) share one store. benchmarks/sweep_store.py
    measures it."""
    global _sqlite_hooked
    if _sqlite_hooked:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "connect", _sqlite_pragmas)
    _sqlite_hooked = True


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    import sqlite3

    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")  # kept in the file: every later connection uses it
    except sqlite3.OperationalError:  # a read-only or in-memory database: keep its journal mode
        pass
    finally:
        cursor.close()


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

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        client = MlflowClient(tracking_uri=self.tracking_uri)
        for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
            client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=self.tracking_uri).log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str) -> None:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=self.tracking_uri).log_artifacts(self.run_id, str(path), artifact_path)


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces), not its runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        # A local store keeps artefacts beside it in the user's repo; a server keeps its own artifact
        # root (a bucket on a cluster), which an explicit location here would override.
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        artifacts = (user_root() / "mlartifacts").as_uri() if local else None
        try:
            return client.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:  # a concurrent stage (a sweep's other experiment) created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
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
        **experiment_tags(),
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
