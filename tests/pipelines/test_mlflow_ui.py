"""The MLflow UI as users open it: a store the stages' own code wrote, served by `mlflow ui`, in headless Chromium.

MLflow 3.17's UI picks the experiment view from a global "GenAI | Model training" switch (the URL's
`workflowType`, else the browser's last choice, else GenAI), not from the `mlflow.experimentKind` tag;
docs/troubleshooting.md gives users the link below, which opens the runs table.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.registry.registry import set_alias
from pipelines.lineage import ROOT_ENV
from tests.pipelines.test_lineage import stage_root, train_stage
from tests.services import browse, chromium, mlflow_server

pytestmark = pytest.mark.browser


class _Text(HTMLParser):
    """The visible text of a DOM dump, one `|`-separated string (scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs) -> None:
        self.hidden += tag in ("script", "style")

    def handle_endtag(self, tag) -> None:
        self.hidden -= tag in ("script", "style")

    def handle_data(self, data) -> None:
        if not self.hidden and data.strip():
            self.parts.append(" ".join(data.split()))  # non-breaking spaces too


def page_text(url: str, folder: Path, name: str) -> str:
    """What the page shows after its scripts ran; its screenshot is kept as `folder/<name>.png`."""
    parser = _Text()
    parser.feed(browse(url, folder, screenshot=folder / f"{name}.png"))
    return "|".join(parser.parts)


def test_runs_and_models_pages_show_the_stages_and_aliases(tmp_path: Path, monkeypatch):
    chromium()  # skip (fail under CI) before building anything when there is no browser
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = stage_root(tmp_path, uri)
    old, _ = train_stage(root, "train_evaluator", family="evaluator", seed=0)
    new, _ = train_stage(root, "train_evaluator", family="evaluator", seed=1)
    tokenizer, _ = train_stage(root, "train_tokenizer", family="tokenizer", seed=2)
    set_alias(tracking_uri=uri, name="genpipe-evaluator", alias="champion", version=old)
    set_alias(tracking_uri=uri, name="genpipe-evaluator", alias="challenger", version=new)
    set_alias(tracking_uri=uri, name="genpipe-tokenizer", alias="champion", version=tokenizer)
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("genpipe").experiment_id

    with mlflow_server(uri, tmp_path / "ui", command="ui") as url:
        runs = page_text(
            f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning", tmp_path, "runs"
        )
        models = page_text(f"{url}/#/models", tmp_path, "models")

    # The runs table of the experiment, each stage run with its data input in the Dataset column ...
    assert "|Runs|" in runs and "|3|matching runs|" in runs, runs[:2000]
    assert re.findall(r"\|(train_\w+)\|", runs) == ["train_tokenizer", "train_evaluator", "train_evaluator"]
    assert runs.count("data/processed (0123456789abcdef") == 3
    # ... not the GenAI overview ("Traces 0", "Detect Issues") the link without workflowType opens.
    assert "Detect Issues" not in runs and "Token Usage" not in runs
    # Every registered model with its aliases (the table shows one alias and "+N" more).
    assert "|genpipe-evaluator|Version 2|@ challenger|: Version 2|+1|" in models, models[:2000]
    assert "|genpipe-tokenizer|Version 1|@ champion|: Version 1|" in models
