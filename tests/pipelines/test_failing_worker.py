"""A worker that fails surfaces on the console as one line naming the culprit, whatever Ray's noise filters drop.

The failure is real: a train shard whose labels were corrupted after `prepare` (99 in a 10-class
set). The driver reads the shard as it is; the worker's first training step rejects the labels.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient

from components.training.ray_trims import QUIET_LOGS
from tests.conftest import run
from tests.pipelines.test_stages import TINY

pytestmark = pytest.mark.slow

FIRST_RUN = (
    "Generated new authentication token",
    "MLflow database tables",
    "Updating database tables",
    "alembic",
)
CULPRIT = "ValueError: evaluator needs labels in 0..9, got range 99..99 (unlabelled data is -1)"


def _corrupt_labels(data: Path) -> None:
    for shard in sorted(data.glob("train-*.parquet")):
        table = pq.read_table(shard)
        i = table.schema.get_field_index("label")
        labels = pa.array([99] * table.num_rows, type=table.schema.field(i).type)
        pq.write_table(table.set_column(i, table.schema.field(i), labels), shard)


def test_a_failing_worker_is_one_line_naming_the_culprit_and_leaves_no_model(repo_copy: Path, tmp_path: Path):
    """On a machine's first run too (a fresh HOME: no ~/.ray/auth_token, no mlflow.db), whose set-up
    lines (Ray's new token, MLflow's table creation) must not reach the console either."""
    home = tmp_path / "home"
    home.mkdir()
    params = {
        "train": {**TINY["train"], "max_failures": 0},  # a restart would fail the same way
        "ray": TINY["ray"],
        "prepare": TINY["prepare"],
        "train_evaluator": TINY["train_evaluator"],
    }
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = run(["genpipe", "prepare"], repo_copy, HOME=str(home))
    assert (repo_copy / "mlflow.db").exists(), "no store was created: the first-run check tests nothing"
    _corrupt_labels(repo_copy / "data" / "processed")

    proc = run(["genpipe", "train_evaluator"], repo_copy, check=False, HOME=str(home))

    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"genpipe: error: train_evaluator: worker rank 0 failed: {CULPRIT}"
    console = proc.stdout + proc.stderr
    # No driver traceback (GENPIPE_DEBUG=1 shows it); a worker's own, forwarded by Ray, may come first.
    assert not [line for line in console.splitlines() if re.match(r"Traceback|\s+File ", line)]
    for _, dropped in QUIET_LOGS.values():
        for message in dropped:
            assert message not in console
    assert (home / ".ray" / "auth_token").exists(), "Ray made no new token: the first-run check tests nothing"
    first_run = [
        x
        for x in (prepared.stdout + prepared.stderr + console).splitlines()
        if any(s in x for s in FIRST_RUN)
    ]
    assert not first_run, first_run
    # Nothing half-written: no model folder (nor a temporary one beside it), the run marked failed.
    models = repo_copy / "models"
    assert not models.exists() or not list(models.iterdir())
    assert not (repo_copy / "reports" / "train_evaluator.json").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{repo_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genpipe")
    runs = client.search_runs([experiment.experiment_id], "tags.`genpipe.stage` = 'train_evaluator'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_model_versions("name = 'genpipe-evaluator'") == []
