"""`make bench`: the judge against deliberately broken sample sets, on 32x32 RGB glyphs.

A workspace prepares `builtin:glyphs` at 32x32 RGB and trains the evaluator with the shipped params
(`genpipe prepare`, `genpipe train_evaluator`). Sample sets built from its train split (N: the
evaluate stage's default, the train split's size) are then scored
by `genpipe evaluate --samples` (pipelines/score.py: the evaluate stage's own judge, evaluator, test
statistics and floor):
- `real`: the train images, each asked for its own class (a perfect generator: FD / floor = 1);
- `noise`: uniform noise in [-1, 1];
- `blank`: every image white;
- `half blank`: the real set with every other image white (the grid issue #21 saw score precision 0.9);
- `one per class`: the first val image of each class, repeated for its class (mode collapse);
- `wrong class`: the real images, each asked for the next class (a generator that ignores its label);
- `grey` (colour data only): the real images with their colours dropped (each pixel its channels'
  mean), a generator that loses colour. The evaluator names glyphs whatever their colour, so its
  learned features barely see it (grey scored 1.15x the floor, issue #21); the thumbnail the features
  end with (components/evaluation/evaluator.py) is what catches it.

Each broken set must be clearly worse than `real` on FD / floor and on the metric aimed at its failure:
recall for the collapse, conditional accuracy for the wrong class. (The wrong class holds the real
images, so its FD is the real set's: FD is blind to the labels asked for, and accuracy is the figure
that sees them.) The evaluator's own test accuracy
stands beside the accuracies: a weak evaluator caps what any generator can reach. The table goes to
BENCHMARKS.md ("## Judge sanity"); the script exits 1 when a broken set is not caught.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
HEAD = "## Judge sanity"
MARGIN = 2.0  # a broken set's FD / floor must be at least this many times the real set's


def _genpipe(*args: str, work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GENPIPE_ROOT": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "genpipe"), *args], cwd=work, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(
            f"judge_sanity: genpipe {' '.join(args)} failed\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return proc


def sample_sets(data: Path, split: str = "train") -> dict[str, dict[str, np.ndarray]]:
    """The sets above, from `split`: uint8 images (N, C, H, W) and the labels asked for."""
    from components.evaluation.batches import LabelledSplit

    pairs = list(LabelledSplit(data, split))
    x = np.concatenate([p[0].numpy() for p in pairs])  # float32 in [-1, 1]
    y = np.concatenate([p[1].numpy() for p in pairs]).astype(np.int64)
    real = np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)
    k = int(y.max()) + 1
    rng = np.random.default_rng(0)
    white = np.full_like(real, 255)
    half = real.copy()
    half[::2] = 255
    first = {c: real[np.flatnonzero(y == c)[0]] for c in range(k) if (y == c).any()}
    collapsed = np.stack([first[int(c)] for c in y])
    sets = {
        "real": {"images": real, "labels": y},
        "noise": {"images": rng.integers(0, 256, real.shape, dtype=np.uint8), "labels": y},
        "blank": {"images": white, "labels": y},
        "half blank": {"images": half, "labels": y},
        "one per class": {"images": collapsed, "labels": y},
        "wrong class": {"images": real, "labels": (y + 1) % k},
    }
    if real.shape[1] > 1:  # grey data has no colour to lose
        grey = np.repeat(real.mean(axis=1, keepdims=True), real.shape[1], axis=1)
        sets["grey"] = {"images": grey.round().astype(np.uint8), "labels": y}
    return sets


def check(rows: dict[str, dict[str, float]]) -> list[str]:
    """The broken sets the judge failed to catch, one line each."""
    real, misses = rows["real"], []
    for name, m in rows.items():
        # FD is blind to labels: the wrong class holds the real images
        if name in ("real", "wrong class"):
            continue
        if not m["fid_over_floor"] >= MARGIN * real["fid_over_floor"]:
            misses.append(
                f"{name}: FD / floor {m['fid_over_floor']:.3g} vs real {real['fid_over_floor']:.3g}"
            )
    if not rows["one per class"]["recall"] < 0.5 * real["recall"]:
        misses.append(
            f"one per class: recall {rows['one per class']['recall']:.3f} vs real {real['recall']:.3f}"
        )
    if not rows["wrong class"]["cond_accuracy"] < 0.5 * real["cond_accuracy"]:
        misses.append(
            f"wrong class: accuracy {rows['wrong class']['cond_accuracy']:.3f} vs real {real['cond_accuracy']:.3f}"
        )
    return misses


def section(rows: dict[str, dict[str, float]], *, test_accuracy: float, n: int, misses: list[str]) -> str:
    lines = [
        f"{HEAD} (`make bench`, `benchmarks/judge_sanity.py`)",
        "",
        f"`builtin:glyphs` at 32x32 RGB, the evaluator trained with the shipped params (its own test accuracy: "
        f"**{test_accuracy:.1%}**). Each set holds the {n:,} train images or their broken copies, scored by "
        "`genpipe evaluate --samples` against the test statistics and the real-vs-real floor.",
        "",
        "| set | FD / floor | cond. accuracy | accuracy / evaluator's | precision | recall |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {m['fid_over_floor']:,.2f} | {m['cond_accuracy']:.1%} | {m['cond_accuracy'] / test_accuracy:.2f} | "
            f"{m['precision']:.3f} | {m['recall']:.3f} |"
            for name, m in rows.items()
        ),
        "",
        "Every broken set caught: FD / floor at least "
        f"{MARGIN:g}x the real set's (but the wrong class, whose images are the real ones: FD cannot see "
        "labels), recall below half for the collapse, accuracy below half for the wrong class."
        if not misses
        else "NOT caught: " + "; ".join(misses),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=4800, help="glyph images prepared")
    ap.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "genpipe-judge-sanity"
    )
    ap.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md alone")
    ap.add_argument("--reuse", action="store_true", help="keep --work's prepared data and evaluator")
    args = ap.parse_args(argv)
    if not (args.reuse and (args.work / "models" / "evaluator" / "test_stats.safetensors").exists()):
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["prepare"].update(source="builtin:glyphs", image_size=32, channels=3)
        params["prepare"].setdefault("glyphs", {})["count"] = args.count
        (args.work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        print("judge_sanity: prepare, train_evaluator ...", flush=True)
        _genpipe("prepare", work=args.work)
        _genpipe("train_evaluator", work=args.work)
    test_accuracy = json.loads((args.work / "reports" / "train_evaluator.json").read_text())["test_accuracy"]
    rows = {}
    for name, arrays in sample_sets(args.work / "data" / "processed").items():
        path = args.work / f"{name.replace(' ', '_')}.npz"
        np.savez(path, **arrays)
        out = json.loads(
            _genpipe("evaluate", "--samples", str(path), work=args.work).stdout.strip().splitlines()[-1]
        )
        rows[name] = out["metrics"]
        print(
            f"judge_sanity: {name}: {json.dumps({k: rows[name][k] for k in ('fid_over_floor', 'cond_accuracy', 'precision', 'recall')})}",
            flush=True,
        )
    misses = check(rows)
    text = section(rows, test_accuracy=test_accuracy, n=len(arrays["labels"]), misses=misses)
    print(text)
    if not args.no_write:
        from benchmarks.scale_report import replace_section

        replace_section(REPO / "BENCHMARKS.md", HEAD, text)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
