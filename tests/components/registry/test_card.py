"""What a registered generator version shows in MLflow: few tags, figures as logged-model metrics, a card.

A tiny pixel diffusion model is logged and registered the way the training stages do it, evaluated
the way `evaluate` records it, and promoted by the gate, in one real sqlite store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.registry.card import (
    EVAL_FIGURES,
    METRIC_PREFIX,
    REQUEST_TAG,
    card_markdown,
    eval_figures,
    split_tags,
)
from components.registry.promote import apply, decide
from components.registry.registry import CHALLENGER, list_versions, logged_model_id, record_evaluation
from tests.components.registry.tiny_generators import register_tiny

NAME = "genpipe-diffusion"
FIGURES = {"fid": 0.2, "fid_floor": 0.1, "fid_over_floor": 2.0, "cond_accuracy": 0.9, "images_per_s": 50.0}
#: What a training stage hands over: lineage, the run's resume key, settings, logged-model hashes, metrics.
STAGE_TAGS = {
    "genpipe.stage": "train_diffusion@pixel",
    "git_commit": "abc123",
    "params_hash": "p" * 64,
    "dvc_data_hash": "data/processed:0123",
    "genpipe.resume_key": "train_diffusion-pixel-1",
    "ray_run_name": "train_diffusion-pixel-1",
    "sampler": "heun",
    "steps": "4",
    "weights_sha256": "w" * 64,
    "metric.val/loss": "0.5",
}


def test_split_tags_keeps_lineage_and_moves_settings():
    keep, settings = split_tags(STAGE_TAGS)
    assert set(keep) == {"genpipe.stage", "git_commit", "params_hash", "dvc_data_hash", "ray_run_name"}
    assert settings == {"sampler": "heun", "steps": "4"}


def test_card_says_figures_floor_grid_and_decision():
    tags = {
        "genpipe.stage": "train_diffusion@pixel",
        EVAL_FIGURES: json.dumps(FIGURES),
        "promote.decision": "kept",
    }
    tags["promote.record"] = json.dumps(
        {"against": "1", "reason": "fid_over_floor 2 does not beat 1.5", "rule": "r"}
    )
    text = card_markdown(
        name=NAME,
        version="2",
        aliases=[CHALLENGER],
        tags=tags,
        settings={"sampler": "heun"},
        training={"val/loss": 0.5},
        request={"num_classes": 10, "options": {"steps": 4}},
        run_id="r1",
        grid="get-artifact?path=evaluate%2Fx.png&run_uuid=r1",
        evaluator=None,
    )
    assert "| FD / floor | 2 |" in text and "| FD | 0.2 (floor 0.1) |" in text
    assert "![class grid: one row per class](get-artifact?path=evaluate%2Fx.png&run_uuid=r1)" in text
    assert "Kept out against champion v1: fid_over_floor 2 does not beat 1.5" in text
    assert "`label` (class 0..9; -1: unconditional), `seed`, `steps` (default 4)" in text
    assert "sampler heun" in text and "val/loss 0.5" in text and "`@challenger`" in text
    with pytest.raises(ValueError, match="eval.figures is not JSON"):
        eval_figures({EVAL_FIGURES: "fid=1"})
    older = {"eval.fid_over_floor": "1.5", "eval.evaluator_sha256": "e" * 64, "eval.options": "defaults"}
    assert eval_figures(older) == {"fid_over_floor": 1.5}  # an older genpipe's tag per figure


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("card")
    return register_tiny(root, pixel_only=True, tags=STAGE_TAGS)


def test_evaluated_and_promoted_version_reads_in_the_ui(store: dict, tmp_path: Path):
    uri, client = store["uri"], MlflowClient(tracking_uri=store["uri"])
    client.delete_registered_model_alias(NAME, "champion")  # register_tiny's; this one is the gate's
    (tmp_path / "diffusion_pixel.png").write_bytes(b"\x89PNG")
    record_evaluation(
        tracking_uri=uri,
        name=NAME,
        version="1",
        metrics=FIGURES,
        tags={"eval.evaluator_sha256": "e" * 64, "eval.options": "defaults"},
        artifact=tmp_path / "diffusion_pixel.png",
    )
    row = next(r for r in list_versions(tracking_uri=uri, name=NAME) if r["version"] == "1")
    apply(
        uri, decide(challenger=row, champion=None, metric="fid_over_floor", margin=0.0), record={"user": "t"}
    )
    mv = client.get_model_version(NAME, "1")
    # The figures are metrics of the logged model (the Models tab) and of its run (the runs table).
    logged = client.get_logged_model(logged_model_id(mv))
    headline = {
        k: v for k, v in FIGURES.items() if k != "fid_floor"
    }  # the floor is in the card, not a column
    assert {m.key: m.value for m in logged.metrics} == {f"{METRIC_PREFIX}{k}": v for k, v in headline.items()}
    run_metrics = client.get_run(mv.run_id).data.metrics
    assert {k: run_metrics[f"{METRIC_PREFIX}{k}"] for k in FIGURES} == FIGURES
    assert logged.name == NAME and logged.params == {"sampler": "heun", "steps": "4"}
    assert json.loads(logged.tags[REQUEST_TAG])["num_classes"] == 3
    # The version: lineage and decision keys only, the figures once as JSON, the card as description.
    assert len(mv.tags) <= 15 and eval_figures(mv.tags) == FIGURES, sorted(mv.tags)
    assert not [k for k in mv.tags if k.startswith(("metric.", "rollback.")) or k in ("sampler", "fid")]
    assert "| FD / floor | 2 |" in mv.description and "Promoted to champion against no earlier champion" in (
        mv.description
    )
    assert f"get-artifact?path=evaluate%2Fdiffusion_pixel.png&run_uuid={mv.run_id}" in mv.description
    assert "`@champion`" in mv.description and "Request columns" in mv.description
    assert "genpipe generator" in client.get_registered_model(NAME).description
