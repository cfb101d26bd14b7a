"""The MLflow UI as users open it: a store the stages' own code wrote, served by `mlflow ui`, in headless Chromium.

MLflow 3.17's UI picks the experiment view from a global "GenAI | Model training" switch (the URL's
`workflowType`, else the browser's last choice, else GenAI), not from the `mlflow.experimentKind` tag;
docs/troubleshooting.md gives users the link below, which opens the runs table.

`GENPIPE_UI_SHOTS=DIR` keeps the registry pages' screenshots in DIR (docs/img/ holds the published ones).
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.evaluation.grid import make_grid, save_png
from components.registry.promote import apply, decide, registry_lock
from components.registry.registry import list_versions, record_evaluation, set_alias
from pipelines.lineage import ROOT_ENV
from tests.components.registry.tiny_generators import register_tiny
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


def page_text(url: str, folder: Path, name: str, *, window: str = "1400,900") -> str:
    """What the page shows after its scripts ran; its screenshot is kept as `folder/<name>.png`."""
    parser = _Text()
    parser.feed(browse(url, folder, screenshot=folder / f"{name}.png", window=window))
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


DATASET = ("data/processed", "0123456789abcdef")  # what evaluate names: the judged data and its DVC md5
#: Two tiny generators' figures: the older one (diffusion, listed last by default) has the better FD / floor.
FIGURES = {
    "genpipe-diffusion": {"fid": 0.15, "fid_floor": 0.1, "fid_over_floor": 1.5, "cond_accuracy": 0.9},
    "genpipe-prior-maskgit": {"fid": 0.3, "fid_floor": 0.1, "fid_over_floor": 3.0, "cond_accuracy": 0.8},
}


def test_models_tab_is_a_leaderboard_and_a_version_shows_its_card(tmp_path: Path):
    import torch

    from components.generators import load_generator

    chromium()
    store = register_tiny(tmp_path, tags={"genpipe.stage": "train_diffusion@pixel", "git_commit": "abc123"})
    uri, client = store["uri"], MlflowClient(tracking_uri=store["uri"])
    for name, figures in FIGURES.items():
        generator = load_generator(
            store["models"][name]
        )  # its class grid: one row per class, as evaluate draws it
        labels = torch.arange(generator.num_classes).repeat_interleave(4)
        grid = tmp_path / f"{store['models'][name].name}.png"
        save_png(
            make_grid(generator.sample(labels, generator=torch.Generator().manual_seed(0)), nrow=4), grid
        )
        client.delete_registered_model_alias(name, "champion")  # register_tiny's: the gate decides here
        record_evaluation(
            tracking_uri=uri,
            name=name,
            version="1",
            metrics=figures,
            tags={"eval.evaluator_sha256": "e" * 64},
            artifact=grid,
            dataset=DATASET,
        )
        row = list_versions(tracking_uri=uri, name=name)[0]
        apply(
            uri,
            decide(challenger=row, champion=None, metric="fid_over_floor", margin=0.0),
            record={"user": "t"},
        )
    experiment = client.get_run(client.get_model_version("genpipe-diffusion", "1").run_id).info.experiment_id
    shots = Path(os.environ.get("GENPIPE_UI_SHOTS") or tmp_path)

    with mlflow_server(uri, tmp_path / "ui", command="ui") as url:
        # Sorting the Models tab by its FD / floor column (header or Sort menu) sends this search: a
        # metric column sorts only when its metrics name their dataset.
        ordered = {
            ascending: [
                m.name
                for m in MlflowClient(tracking_uri=url).search_logged_models(
                    experiment_ids=[experiment],
                    order_by=[
                        {
                            "field_name": "metrics.eval/fid_over_floor",
                            "ascending": ascending,
                            "dataset_name": DATASET[0],
                            "dataset_digest": DATASET[1],
                        }
                    ],
                )
            ]
            for ascending in (True, False)
        }
        with registry_lock(url, "genpipe-diffusion"):  # a promotion in flight: its lock is an experiment
            held = MlflowClient(tracking_uri=url).search_experiments(
                filter_string="name LIKE 'genpipe-lock.%'"
            )
            models = page_text(f"{url}/#/models", tmp_path, "registered-models")
        leaderboard = page_text(
            f"{url}/#/experiments/{experiment}/models?workflowType=machine_learning",
            tmp_path,
            "models-tab",
            window="3000,500",  # the table renders the columns in view only; the metrics come after seven
        )
        dom = browse(
            f"{url}/#/models/genpipe-diffusion/versions/1", tmp_path, screenshot=tmp_path / "version.png"
        )
        src = re.search(r'<img src="([^"]*get-artifact[^"]*)"', dom)
        assert src, dom[:3000]
        with urllib.request.urlopen(f"{url}/{src.group(1).replace('&amp;', '&')}") as got:
            assert got.read(8) == b"\x89PNG\r\n\x1a\n"  # the card's grid is the logged artefact, served
    version = _Text()
    version.feed(dom)
    card = "|".join(version.parts)

    # The Models tab lists both generators (newest first) with their FD / floor; sorting by it reorders them.
    assert "|eval/fid_over_floor|" in leaderboard, leaderboard[:3000]
    listed = re.findall(r"\|(genpipe-[a-z-]+)\|Ready\|", leaderboard)
    assert listed == ["genpipe-prior-maskgit", "genpipe-diffusion"], leaderboard[:3000]
    assert ordered == {True: listed[::-1], False: listed}
    assert "|3|" in leaderboard and "|1.5|" in leaderboard
    # The version page: its card (figures against the floor, the decision) and a handful of tags.
    assert "FD / floor" in card and "Promoted to champion" in card, card[:3000]
    assert len(client.get_model_version("genpipe-diffusion", "1").tags) <= 15
    # No registered model is a lock, even while one is held.
    assert len(held) == 1 and held[0].name.startswith("genpipe-lock.diffusion.")
    assert "lock" not in models.lower(), models[:3000]
    assert "|genpipe-diffusion|" in models and "|genpipe-prior-maskgit|" in models
    for page in ("registered-models", "models-tab", "version"):
        if shots != tmp_path:
            shutil.copy(tmp_path / f"{page}.png", shots / f"mlflow-{page}.png")
