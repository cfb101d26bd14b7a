"""Registry commands: `promote MODEL...` (the champion/challenger gate), `rollback MODEL`, `models`.

The gate compares the figures that `evaluate` writes on each version (its `eval.figures` tag, JSON). Each model is decided
alone, inside its lock: the rows are read, the gate decides, and the verdict goes onto the challenger
(`promote.*` tags), into the model's history (`decision.<n>` tags) and into `reports/promote.json`
(one entry per registered name, merged) before the lock is released. Deciding inside the lock makes a
lost race harmless: the loser finds the champion where it would have put it and exits 0.
The lock's wait and break age come from GENPIPE_LOCK_WAIT and GENPIPE_LOCK_BREAK_AFTER (seconds).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from mlflow.exceptions import MlflowException

from components.config import load_stage, read_params, validate_section
from components.generators import MODELS
from components.io import weights_sha256, write_json
from components.registry.card import eval_figures
from components.registry.promote import (
    DEFAULT_BREAK_AFTER,
    DEFAULT_TIMEOUT,
    Decision,
    apply,
    check_break_after,
    decide,
    file_lock,
    history,
    registry_lock,
    rollback,
)
from components.registry.registry import (
    CHALLENGER,
    CHAMPION,
    FAMILIES,
    list_versions,
    logged_model_tags,
    registered_name,
)
from pipelines.lineage import dvc_data_hash, repo_root
from pipelines.runtime import tracking_uri

EVALUATIONS = "reports/evaluate"  # the evaluate stage's reports, one per model

REPORT = "reports/promote.json"
HISTORY = "history"  # `genpipe models --lineage MODEL@history`: the decision history, not a version
WAIT_ENV, BREAK_AFTER_ENV = "GENPIPE_LOCK_WAIT", "GENPIPE_LOCK_BREAK_AFTER"
#: What makes one model's outcome a failure without stopping the others.
FAILURES = (ValueError, OSError, ArithmeticError, KeyError, RuntimeError, MlflowException)
TABLE_METRICS = ("fid_over_floor", "cond_accuracy", "bits_per_dim")
LINEAGE_TAGS = (
    "genpipe.stage",
    "git_commit",
    "dvc_data_hash",
    "params_hash",
    "ray_run_name",
    "ray_storage_path",
    "eval.evaluator_sha256",
    "model_sha256",
    "weights_sha256",  # these three: tags of a generator's logged model, not of the version
    "code_sha256",
    "tokenizer_sha256",
)


def resolve(model: str) -> str:
    """A registered name (`genpipe-diffusion`) or a models/ folder (`diffusion_pixel`) -> registered name."""
    if model in MODELS:
        return MODELS[model]
    names = {registered_name(f) for f in FAMILIES}
    if model in names:
        return model
    raise ValueError(f"unknown model {model!r}; valid: {', '.join([*MODELS, *sorted(names)])}")


def store_uri(params: Path) -> str:
    return tracking_uri(validate_section("mlflow", read_params(params).get("mlflow")))


def _by_alias(rows: list[dict], alias: str) -> dict | None:
    return next((r for r in rows if alias in r["aliases"]), None)


def _stamp() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return {"user": user, "time": datetime.now(UTC).isoformat(timespec="seconds")}


def _challenger_from_report(params: Path, model: str) -> bool:
    """Record `reports/evaluate/<model>.json` on the registered version, if DVC vouches for the report.

    DVC skips `evaluate@<model>` when its model, judge and code are unchanged (a fresh clone whose
    training reproduced the committed weights), but the MLflow store is not versioned: the version
    the training stage just registered there has no figures and no `challenger` alias yet. When
    `dvc status` finds the stage up to date, the report judged exactly these weights.
    """
    from components.registry.registry import record_judgement

    root = repo_root()
    report = root / EVALUATIONS / f"{model}.json"
    if not report.is_file() or not _dvc_up_to_date(root, f"evaluate@{model}"):
        return False
    sections = load_stage(params, "evaluate")
    if not sections["mlflow"].register_models:
        return True
    version = record_judgement(
        tracking_uri=tracking_uri(sections["mlflow"]),
        name=MODELS[model],
        model_dir=root / "models" / model,
        evaluator_dir=root / "models" / "evaluator",
        metrics=json.loads(report.read_text()),
        options=sections["evaluate"].options.get(model, {}),
        artifact=root / EVALUATIONS / f"{model}.png",
        dataset=tuple(dvc_data_hash(["data/processed"]).split(":", 1)),  # as evaluate.judged_data
    )
    if version is not None:
        print(
            f"promote: {MODELS[model]} version {version} is the challenger (from {report.relative_to(root)})"
        )
    return True


def _dvc_up_to_date(root: Path, stage: str) -> bool:
    """Whether `dvc status` finds `stage` unchanged (False outside a DVC repo or for an unknown stage)."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            return repo.status(targets=[stage]) == {}
    except Exception:  # not a DVC repo, no such stage, a broken lock: nothing to vouch with
        return False


def lock_settings() -> dict[str, float]:
    """The lock's wait and break age (seconds) from the environment, validated before any work."""
    return {
        "timeout": _seconds(WAIT_ENV, DEFAULT_TIMEOUT),
        "break_after": _seconds(BREAK_AFTER_ENV, DEFAULT_BREAK_AFTER),
    }


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = raw
    return check_break_after(value, source=env)


def _warn(message: str) -> None:
    print(f"promote: warning: {message}", file=sys.stderr, flush=True)


def _own_challenger(rows: list[dict], name: str) -> dict | None:
    """The version this workspace's models/<folder> was registered as (its model_sha256), once judged.

    Concurrent experiments of a sweep share one registry: each `evaluate` moves the `challenger`
    alias to its own version, so between one experiment's evaluate and its promote the alias may name
    another experiment's model. Deciding on the workspace's own weights keeps every experiment's
    model in the contest; without a judged version of them, the alias decides.
    """
    folder = next((m for m, n in MODELS.items() if n == name), None)
    model_dir = repo_root() / "models" / folder if folder else None
    if model_dir is None or not (model_dir / "model.safetensors").is_file():
        return None
    sha = weights_sha256(model_dir)
    judged = [r for r in rows if r["tags"].get("model_sha256") == sha and eval_figures(r["tags"])]
    return judged[-1] if judged else None


def _decide(rows: list[dict], *, metric: str, margin: float) -> Decision:
    own, alias = _own_challenger(rows, rows[0]["name"]) if rows else None, _by_alias(rows, CHALLENGER)
    if own is not None and alias is not None and own["version"] != alias["version"]:
        print(
            f"promote: {own['name']}: deciding v{own['version']}, this workspace's model "
            f"(the challenger alias is on v{alias['version']}, another run's)"
        )
    decision = decide(
        challenger=own or alias,
        champion=_by_alias(rows, CHAMPION),
        metric=metric,
        margin=margin,
    )
    name = decision.name
    champion = (
        f"v{decision.champion} ({metric} {decision.champion_value:.6g})"
        if decision.champion and decision.champion_value is not None
        else _v(decision.champion)
    )
    verb = "decision: promote" if decision.promote else "decision: keep the champion"
    print(
        f"promote: {name}: challenger v{decision.challenger} ({metric} {decision.challenger_value:.6g}) vs champion {champion}"
    )
    print(f"promote: {name}: {verb}: {decision.reason} [rule: {decision.rule}]")
    return decision


def main(*, params: Path, model: str, metric: str, margin: float, dry_run: bool = False) -> None:
    """Decide challenger vs champion on `metric`; unless `dry_run`, record it and move the alias, all under the lock."""
    uri, name = store_uri(params), resolve(model)
    settings = lock_settings()
    rows = list_versions(tracking_uri=uri, name=name)
    if _by_alias(rows, CHALLENGER) is None and not dry_run:
        # A fresh store beside committed reports: DVC skipped an unchanged evaluate stage.
        folder = next((m for m, n in MODELS.items() if n == name), None)
        if folder and _challenger_from_report(params, folder):
            rows = list_versions(tracking_uri=uri, name=name)
    if dry_run:
        _decide(rows, metric=metric, margin=margin)
        print("promote: --dry-run: nothing changed")
        return
    stamp = _stamp()
    with registry_lock(uri, name, **settings, on_break=_warn) as lease:
        decision = _decide(list_versions(tracking_uri=uri, name=name), metric=metric, margin=margin)
        lease.verify()
        changed = apply(uri, decision, record=stamp)
        if changed:
            outcome = "promoted" if decision.promote else "kept"
            _report(name, {**decision.as_record(), "decision": outcome, **stamp})
    champion = decision.challenger if decision.promote else decision.champion
    if changed:
        print(f"promote: {name}: champion is {_v(champion)} -> {REPORT}")
        return
    print(f"promote: {name}: champion is {_v(champion)} (unchanged, nothing new to record)")
    path = (
        repo_root() / REPORT
    )  # the stage's output: a workspace (a DVC experiment's copy) without it gets one
    if not path.is_file() or name not in json.loads(path.read_text()):
        _report(name, {**decision.as_record(), "decision": "unchanged", **stamp})


def main_many(
    *, params: Path, models: list[str], metric: str, margin: float, dry_run: bool = False
) -> list[str]:
    """Decide every named model, each alone; the failures as `model: reason` lines ([] when all went well)."""
    lock_settings()  # a bad setting is one error for the command, not one per model
    failures = []
    for model in models:
        try:
            main(params=params, model=model, metric=metric, margin=margin, dry_run=dry_run)
        except FAILURES as err:
            if os.environ.get("GENPIPE_DEBUG"):
                raise
            text = str(err).strip()
            message = text.splitlines()[0] if text else type(err).__name__
            print(f"promote: {model}: not decided: {message}", flush=True)
            failures.append(f"{model}: {message}")
    return failures


def rollback_main(*, params: Path, model: str) -> None:
    """Give `champion` back to the version the current champion replaced, and retire the current one."""
    uri, name = store_uri(params), resolve(model)
    settings = lock_settings()
    current = _by_alias(list_versions(tracking_uri=uri, name=name), CHAMPION)
    stamp = _stamp()
    with registry_lock(uri, name, **settings, on_break=_warn) as lease:
        lease.verify()
        old, new = rollback(uri, name, expected=current and current["version"], record=stamp)
        _report(name, {"name": name, "decision": "rolled_back", "from": old, "to": new, **stamp})
    print(
        f"rollback: {name}: champion v{old} -> v{new}; v{old} is retired (never promoted again) -> {REPORT}"
    )


def _report(name: str, entry: dict) -> None:
    """Read-modify-write of reports/promote.json under its own lock (temp file + rename): other models' entries stay."""
    path = repo_root() / REPORT
    with file_lock(path.parent / f".{path.name}.lock", timeout=60):
        report = json.loads(path.read_text()) if path.is_file() else {}
        report[name] = entry
        write_json(path, report)


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


# --- listing ----------------------------------------------------------------------------------
def models_table(*, params: Path) -> list[str]:
    """One line per registered version: name, version, aliases, key eval figures, run."""
    rows = list_versions(tracking_uri=store_uri(params))
    if not rows:
        return ["no registered genpipe models"]
    head = (
        f"{'name':<28} {'version':<7} {'aliases':<22} "
        + " ".join(f"{m:>14}" for m in TABLE_METRICS)
        + "  run"
    )
    lines = [head]
    for r in rows:
        got = eval_figures(r["tags"])
        figures = " ".join(f"{f'{got[m]:.6g}' if m in got else '-':>14}" for m in TABLE_METRICS)
        lines.append(
            f"{r['name']:<28} v{r['version']:<6} {','.join(r['aliases']) or '-':<22} {figures}  {r['run_id']}"
        )
    return lines


def lineage(*, params: Path, target: str) -> list[str]:
    """`MODEL@ALIAS` (or `MODEL@VERSION`) -> `key: value` lines of that version's lineage tags;
    `MODEL@history` -> the model's decision history."""
    model, sep, alias = target.partition("@")
    if not sep or not alias:
        raise ValueError(f"--lineage wants MODEL@ALIAS (e.g. genpipe-diffusion@champion), got {target!r}")
    name = resolve(model)
    if alias == HISTORY:
        return history_lines(store_uri(params), name)
    rows = list_versions(tracking_uri=store_uri(params), name=name)
    row = (
        next((r for r in rows if r["version"] == alias), None) if alias.isdigit() else _by_alias(rows, alias)
    )
    if row is None:
        raise ValueError(f"no version of {name} with {'version' if alias.isdigit() else 'alias'} {alias}")
    lines = [f"{name} v{row['version']} aliases={','.join(row['aliases']) or '-'} run={row['run_id']}"]
    tags = {**logged_model_tags(store_uri(params), name, row["version"]), **row["tags"]}
    lines += [f"  {key}: {tags.get(key, '-')}" for key in LINEAGE_TAGS]
    return lines


def history_lines(uri: str, name: str) -> list[str]:
    """The model's decision history (registered-model tags decision.<n>), one line each, oldest first."""
    lines = [f"decisions of {name} (tags decision.<n>):"]
    for e in history(uri, name):
        who = f"{e.get('user', '?')} {e.get('time', '?')}"
        if e.get("decision") == "rolled_back":
            lines.append(f"  {e['n']}: {who}: rolled back v{e['from']} -> v{e['to']}")
        else:
            lines.append(
                f"  {e['n']}: {who}: {e['decision']} challenger v{e['challenger']} against {_v(e['champion'])}: {e['reason']}"
            )
    return lines if len(lines) > 1 else [*lines, "  none"]
