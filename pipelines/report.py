"""Stage `report`: every generator's evaluation in one `reports/evaluate.json` and a results table.

`evaluate@<model>` writes one file per model (so an unchanged model is not judged again); this
gathers them, keyed by registered model name as the metrics contract asks, and renders
`reports/results.md` (family, Fréchet distance, conditional accuracy, bits/dim, sampling images/s,
training time) from the same numbers, so the table never drifts from the reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.catalog import GENERATORS
from components.generators import MODELS
from components.io import atomic_file, write_json
from pipelines.lineage import repo_root

STAGE = "report"
EVALUATIONS, SUMMARY, TABLE = "reports/evaluate", "reports/evaluate.json", "reports/results.md"
COLUMNS = (
    ("fid", "FD", "{:.4f}"),
    ("fid_over_floor", "FD / floor", "{:.2f}"),
    ("cond_accuracy", "cond. acc.", "{:.1%}"),
    ("precision", "precision", "{:.2f}"),
    ("recall", "recall", "{:.2f}"),
    ("bits_per_dim", "bits/dim", "{:.3f}"),
    ("nfe", "NFE", "{:.0f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("images_per_s", "sampling img/s", "{:.0f}"),
)


#: registered name -> what the table calls its family
FAMILIES = {m.registered: m.label for m in GENERATORS}


def gather(root: Path) -> dict[str, dict[str, float]]:
    """{registered name: metrics} of every evaluated model, plus its training time where recorded."""
    out = {}
    for model, name in MODELS.items():
        path = root / EVALUATIONS / f"{model}.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        train = root / "reports" / f"train_{model}.json"
        if train.is_file() and "train_seconds" in (t := json.loads(train.read_text())):
            metrics["train_seconds"] = t["train_seconds"]
        out[name] = metrics
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per model (in MODELS order), blank where a figure does not apply."""
    head = "| family | model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|---|---|" + "---:|" * len(COLUMNS)
    order = [n for n in MODELS.values() if n in summary] + sorted(set(summary) - set(MODELS.values()))
    rows = [
        f"| {FAMILIES.get(name, '')} | {name} | "
        + " | ".join(fmt.format(summary[name][k]) if k in summary[name] else "" for k, _, fmt in COLUMNS)
        + " |"
        for name in order
    ]
    return "\n".join([head, rule, *rows]) + "\n"


def main(*, params: Path, dry_run: bool = False) -> None:
    root = repo_root()
    summary = gather(root)
    if dry_run:
        print(table(summary))
        return
    if not summary:
        raise FileNotFoundError(f"no evaluations in {EVALUATIONS}/: run the evaluate stages first")
    write_json(root / SUMMARY, summary)
    with atomic_file(root / TABLE) as tmp:
        tmp.write_text(table(summary))
    print(table(summary), end="")
    print(f"{STAGE}: {len(summary)} models -> {SUMMARY}, {TABLE}")
