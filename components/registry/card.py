"""What a registered version shows in the MLflow UI: a few lineage tags, its figures, a model card.

A version's tags are kept to lineage and decision keys (`VERSION_TAGS`, `eval.*`, `promote.*`): the
UI shows every tag in one cell. The rest lives where the UI sorts and reads it: a generator's own
settings are parameters of its logged model, its evaluation figures are metrics of the logged model
and of its run (the experiment's Models tab is the leaderboard), its training figures are the run's
`final/*` metrics, and the card (the version's markdown description) says it all in one page. The
card is rebuilt from that state after each change (registered, evaluated, decided), never edited.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components import catalog
from components.io import weights_sha256

#: The tags a registering stage hands over that stay on the version: what made it, and the keys
#: that find it (`model_sha256`) or its inputs (`tokenizer_version`).
VERSION_TAGS = (
    "genpipe.stage",
    "git_commit",
    "params_hash",
    "dvc_data_hash",
    "model_sha256",
    "ray_run_name",
    "ray_storage_path",
    "tokenizer_version",
    "dvc.experiment",  # a DVC experiment's name and baseline commit (pipelines/lineage.py)
    "dvc.baseline_rev",
)
#: Handed over but kept elsewhere: the run's resume key (equal to ray_run_name) and the logged model's
#: own hashes (weights, code, carried tokenizer) stay on the run and on the logged model.
ELSEWHERE = ("genpipe.resume_key", "weights_sha256", "code_sha256", "tokenizer_sha256")
TRAINING_PREFIX = "metric."  # a stage's reports/*.json figures: the run's `final/*` metrics instead

EVAL_FIGURES = "eval.figures"  # JSON object: every key of reports/evaluate/<model>.json (the gate reads it)
EVAL_OPTIONS = "eval.options"
EVALUATOR_TAG = "eval.evaluator_sha256"
DECISION_TAG, RECORD_TAG = "promote.decision", "promote.record"  # promoted|kept; the verdict as JSON
PREVIOUS_TAG = "promote.previous_champion"  # on a new champion: the version it replaced
ROLLED_BACK_TAG = "promote.rolled_back"  # on a version that a rollback took champion from: never again
METRIC_PREFIX = "eval/"  # evaluation figures as metrics of the run and of the logged model
REQUEST_TAG = "genpipe.request"  # logged-model tag: the request columns (serving.describe) as JSON

#: The card's headline figures, in order: (key, label, digits).
HEADLINE = (
    ("fid", "FD", 4),
    ("fid_over_floor", "FD / floor", 4),
    ("cond_accuracy", "cond. accuracy", 3),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("bits_per_dim", "bits/dim", 3),
    ("images_per_s", "images/s", 4),
)


#: The logged model's metrics (the Models tab's columns, in this order): the headline figures, FD / floor first.
LEADERBOARD = (
    "fid_over_floor",
    "fid",
    "cond_accuracy",
    "precision",
    "recall",
    "bits_per_dim",
    "images_per_s",
)


def split_tags(tags: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A registering stage's tags -> (version tags, settings: the model's own knobs)."""
    version, settings = {}, {}
    for key, value in tags.items():
        if key in VERSION_TAGS:
            version[key] = str(value)
        elif key not in ELSEWHERE and not key.startswith(TRAINING_PREFIX):
            settings[key] = str(value)
    return version, settings


def eval_figures(tags: dict[str, str]) -> dict[str, float]:
    """The evaluation figures recorded on a version ({} when it was never evaluated).

    A version evaluated by an older genpipe has one tag per figure (`eval.<key>`) instead: read too,
    so its champion can still be compared with a new challenger.
    """
    raw = tags.get(EVAL_FIGURES)
    if not raw:
        legacy = {k.removeprefix("eval."): v for k, v in tags.items() if k.startswith("eval.")}
        return {k: float(v) for k, v in legacy.items() if k not in ("evaluator_sha256", "options")}
    try:
        figures = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(
            f"tag {EVAL_FIGURES} is not JSON: {raw[:60]!r}; run `genpipe evaluate` again"
        ) from None
    return {k: float(v) for k, v in figures.items()}


def registered_description(name: str) -> str:
    """The registered model's description: what the family is and how to read its versions."""
    spec = next((m for m in catalog.MODELS if m.registered == name), None)
    what = spec.label if spec else name.removeprefix("genpipe-")
    if spec and spec.generator:
        return (
            f"**{what}**: a genpipe generator, trained by `{spec.command}` from `{spec.data}` and judged by "
            f"`evaluate@{spec.name}`. Each version's description is its model card (figures, class grid, "
            "lineage, the promotion decision); `@champion` is the version in use, `@challenger` the latest "
            "evaluated. Compare versions by FD / floor in the experiment's Models tab."
        )
    command = spec.command if spec else "its stage"
    return f"**{what}**, trained by `{command}`. Each version's description lists its figures and lineage."


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def _figures_table(figures: dict[str, float]) -> list[str]:
    floor = figures.get("fid_floor")
    if floor is None and figures.get("fid_over_floor") and "fid" in figures:
        floor = figures["fid"] / figures["fid_over_floor"]
    rows = ["| figure | value |", "|---|---|"]
    for key, label, digits in HEADLINE:
        if key in figures:
            note = f" (floor {_fmt(floor, 4)})" if key == "fid" and floor else ""
            rows.append(f"| {label} | {_fmt(figures[key], digits)}{note} |")
    return rows


def _decision(tags: dict[str, str], aliases: list[str]) -> str:
    if tags.get(ROLLED_BACK_TAG):
        return f"Rolled back: {tags[ROLLED_BACK_TAG]}; the gate never promotes it again."
    record = json.loads(tags.get(RECORD_TAG) or "{}")
    decided = tags.get(DECISION_TAG)
    if decided:
        against = record.get("against", "none")
        over = "no earlier champion" if against == "none" else f"champion v{against}"
        verb = "Promoted to champion" if decided == "promoted" else "Kept out"
        who = ", ".join(record[k] for k in ("user", "time") if k in record)
        who = f" ({who})" if who else ""
        return f"{verb} against {over}: {record.get('reason', '')} (rule: `{record.get('rule', '?')}`){who}."
    if "champion" in aliases:
        return "Champion (set by hand, no gate decision recorded)."
    return "Not decided yet: `genpipe promote` compares it with the champion."


def card_markdown(
    *,
    name: str,
    version: str,
    aliases: list[str],
    tags: dict[str, str],
    settings: dict[str, str],
    training: dict[str, float],
    request: dict | None,
    run_id: str,
    grid: str | None,
    evaluator: str | None,
) -> str:
    """The version's card, from its state alone (pure: the UI renders it as markdown)."""
    spec = next((m for m in catalog.MODELS if m.registered == name), None)
    title = f"### {name} v{version}: {spec.label if spec else name}"
    lines = [title + (" · " + " · ".join(f"`@{a}`" for a in sorted(aliases)) if aliases else ""), ""]
    figures = eval_figures(tags)
    if figures:
        lines += _figures_table(figures) + [""]
        options = tags.get(EVAL_OPTIONS, "defaults")
        judged = ", ".join(f"{k} {v}" for k, v in settings.items()) or "its trained defaults"
        lines.append(
            f"Judged on {int(figures.get('num_samples', 0)) or 'N'} samples with its settings ({judged}), "
            f"sampling options: {options}; evaluator {evaluator or (tags.get(EVALUATOR_TAG, '')[:12] or '?')}."
        )
        if grid:
            lines += ["", f"![class grid: one row per class]({grid})", "", f"[class grid]({grid})"]
    elif spec and spec.generator:
        lines.append("Not evaluated yet: `genpipe evaluate` records its figures here.")
    if spec and spec.generator:
        lines += ["", f"**Decision:** {_decision(tags, aliases)}"]
    data = tags.get("dvc_data_hash", "untracked")
    lines += [
        "",
        f"**Lineage:** stage `{tags.get('genpipe.stage', '?')}`, data `{data}`, "
        f"params `{tags.get('params_hash', '?')[:12]}`, git `{tags.get('git_commit', '?')}`, run `{run_id}`.",
    ]
    if training:
        shown = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in sorted(training.items()))
        lines += ["", f"**Training:** {shown}."]
    if request:
        classes = request.get("num_classes", 0)
        label = (
            f"class 0..{classes - 1}; -1: unconditional" if classes else "-1 or empty: an unconditional model"
        )
        columns = [f"`label` ({label})", "`seed`"]
        columns += [f"`{k}` (default {v})" for k, v in request.get("options", {}).items()]
        lines += [
            "",
            "**Request columns** (one row per image; checked by the model itself, hence not in the "
            "MLflow signature): " + ", ".join(columns) + ". Output: `image` (base64 PNG), `label`, `seed`.",
        ]
    return "\n".join(lines) + "\n"


def grid_url(run_id: str, path: str) -> str:
    """The class grid as the tracking server serves it, relative to the UI's page (any host, any port)."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


def refresh_card(client: MlflowClient, name: str, version: str, *, grid: str | None = None) -> str:
    """Rebuild the version's card from its tags, run and logged model, and store it as its description."""
    from components.registry.versions import logged_model_id

    mv = client.get_model_version(name, version)
    tags = dict(mv.tags)
    held = client.get_registered_model(name).aliases or {}
    aliases = [a for a, v in held.items() if str(v) == str(version)]
    run = client.get_run(mv.run_id)
    training = {k.removeprefix("final/"): v for k, v in run.data.metrics.items() if k.startswith("final/")}
    settings, request = {}, None
    model_id = logged_model_id(mv)
    if model_id:
        logged = client.get_logged_model(model_id)
        settings = dict(logged.params)
        request = json.loads(logged.tags.get(REQUEST_TAG) or "null")
    if grid is None:
        grid = next(
            (
                grid_url(mv.run_id, f.path)
                for f in client.list_artifacts(mv.run_id, "evaluate")
                if f.path.endswith(".png")
            ),
            None,
        )
    evaluator = None
    if tags.get(EVALUATOR_TAG):
        try:
            found = client.search_model_versions(
                f"name='genpipe-evaluator' and tags.model_sha256='{tags[EVALUATOR_TAG]}'"
            )
            evaluator = f"genpipe-evaluator v{found[0].version}" if found else None
        except MlflowException:
            evaluator = None
    text = card_markdown(
        name=name,
        version=str(version),
        aliases=aliases,
        tags=tags,
        settings=settings,
        training=training,
        request=request,
        run_id=mv.run_id,
        grid=grid,
        evaluator=evaluator and f"{evaluator} (sha256 {tags[EVALUATOR_TAG][:12]})",
    )
    client.update_model_version(name, version, description=text)
    return text


# --- the evaluate stage's record ------------------------------------------------------------
def record_evaluation(
    *,
    tracking_uri: str,
    name: str,
    version: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    artifact: Path,
    dataset: tuple[str, str] | None = None,
) -> None:
    """Evaluation figures as metrics `eval/*` of the version's run and of its logged model (the Models
    tab's leaderboard), the grid into the run, the figures as one JSON tag on the version (what the
    gate reads), then its card; the version becomes the challenger.

    `dataset` (name, digest) is the data the figures were measured on: the Models tab sorts a metric
    column only when its metrics name their dataset (MLflow 3.17).
    """
    from mlflow.entities import Metric

    from components.registry.versions import CHALLENGER, logged_model_id

    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version(name, version)
    now = int(time.time() * 1000)
    model_id = logged_model_id(mv)
    on_model = {"model_id": model_id} if model_id else {}
    if model_id and dataset:
        on_model |= {"dataset_name": dataset[0], "dataset_digest": dataset[1]}
    for k in [k for k in LEADERBOARD if k in metrics]:  # in this order: the Models tab's columns
        # one call each: log_batch drops a metric's dataset (MLflow 3.17)
        client.log_metric(mv.run_id, f"{METRIC_PREFIX}{k}", float(metrics[k]), now, 0, **on_model)
    rest = [
        Metric(f"{METRIC_PREFIX}{k}", float(v), now, 0) for k, v in metrics.items() if k not in LEADERBOARD
    ]
    client.log_batch(mv.run_id, metrics=rest)  # the rest on the run only
    client.log_artifact(mv.run_id, str(artifact), "evaluate")
    figures = json.dumps({k: float(v) for k, v in metrics.items()}, sort_keys=True)
    for k, v in {EVAL_FIGURES: figures, **tags}.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, CHALLENGER, version)
    refresh_card(client, name, version, grid=grid_url(mv.run_id, f"evaluate/{artifact.name}"))


def record_judgement(
    *,
    tracking_uri: str,
    name: str,
    model_dir: Path,
    evaluator_dir: Path,
    metrics: dict[str, float],
    options: dict,
    artifact: Path,
    dataset: tuple[str, str] | None = None,
) -> str | None:
    """The judge's figures onto the version of `name` whose weights are `model_dir`'s (by sha256),
    which becomes the challenger; its version, or None when no version holds these weights."""

    from components.registry.versions import version_by_tag

    found = version_by_tag(
        tracking_uri=tracking_uri, name=name, key="model_sha256", value=weights_sha256(model_dir)
    )
    if found is None:
        return None
    tags = {
        EVALUATOR_TAG: weights_sha256(evaluator_dir),
        EVAL_OPTIONS: str(options or "defaults"),
    }
    record_evaluation(
        tracking_uri=tracking_uri,
        name=name,
        version=found["version"],
        metrics=metrics,
        tags=tags,
        artifact=artifact,
        dataset=dataset,
    )
    return found["version"]
