"""`genpipe evaluate --samples PATH [--model NAME]`: judge a sample set made elsewhere.

The set (a `.npz`/`.npy` or an image folder, components/evaluation/samples.py) streams through the
evaluate stage's own scorer, evaluator, test statistics and FD floor, in the stage's batches, so its
figures compare with reports/evaluate.json; re-scoring the stage's `--dump-samples` reproduces them.
The result is JSON on stdout (progress goes to stderr) and, with `--out FILE`, in FILE (temp, then
rename); the stage's own reports are never written. This module also holds what the stage and
`--samples` share: the judge's setup, the real test batches, the progress line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from components.config import load_stage
from components.data.shards import read_meta
from components.evaluation.batches import SplitImages
from components.evaluation.evaluator import load_evaluator
from components.evaluation.reference import load_reference
from components.evaluation.samples import SampleSet
from components.evaluation.scorer import SampleScorer, real_features
from components.generators import MODELS
from components.io import write_json
from components.stages import EvaluateConfig
from pipelines.lineage import repo_root
from pipelines.runtime import print_config

STAGE = "evaluate"
DATA, EVALUATOR = "data/processed", "models/evaluator"
REPORTS = "reports/evaluate"


def setup(cfg: EvaluateConfig, *, root: Path, workers: bool = False) -> tuple[dict, torch.device]:
    """The prepared data's meta and this process's device, with its threads set (stage and --samples alike).

    With `workers` (evaluate.num_workers > 0) the Ray actors sample on evaluate.device and this
    process, which only merges their scores, stays on the CPU: a CPU head node drives GPU workers.
    """
    meta = read_meta(root / DATA)
    if workers:
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        return meta, torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluate.device=cuda but no CUDA device is visible; set evaluate.device: cpu")
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    return meta, torch.device(cfg.device)


def real_test_images(root: Path, cfg: EvaluateConfig) -> SplitImages:
    """The real test split, streamed in the judge's batches (its features serve precision/recall)."""
    return SplitImages(root / DATA, "test", batch_size=cfg.batch_size)


def progress_line(label: str, *, file: TextIO | None = None, stage: str = STAGE):
    """Periodic lines with rate and ETA (a line per ~10% of the set), on stdout or `file`."""
    last = [-1]

    def report(done: int, total: int, seconds: float) -> None:
        tenth = done * 10 // total
        if tenth == last[0] and done < total:
            return
        last[0] = tenth
        rate = done / max(seconds, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        print(
            f"{stage}: {label}: {done}/{total} images | {rate:.0f} images/s | ETA {eta:.0f}s",
            file=file or sys.stdout,
            flush=True,
        )

    return report


def check_out(out: Path, *, root: Path) -> None:
    """--out may be any JSON file but the stage's own reports (reports/evaluate.json, reports/evaluate/)."""
    target, reports = out.resolve(), (root / "reports").resolve()
    if target.suffix != ".json":
        raise ValueError(f"--out {out}: the result is JSON; name a .json file")
    stage_report = target.parent == reports and target.name.startswith("evaluate")
    if stage_report or reports / "evaluate" in target.parents:
        raise ValueError(f"--out {out}: that is the evaluate stage's report; write the result elsewhere")


def score_samples(
    *,
    params: Path,
    samples: Path,
    model: str | None = None,
    out: str | Path | None = None,
    dry_run: bool = False,
) -> dict:
    """Score the set at `samples` as the stage scores a generator's; print (and write) the JSON result."""
    if model is not None and model not in MODELS:
        raise ValueError(f"--model {model!r} is not a generator; valid: {', '.join(MODELS)}")
    sections = load_stage(params, STAGE)
    cfg: EvaluateConfig = sections[STAGE]
    root = repo_root()
    if out is not None:
        check_out(Path(out), root=root)
    meta, device = setup(cfg, root=root)
    num_classes = int(meta.get("num_classes") or 0)
    sample_set = SampleSet(
        samples,
        channels=meta["channels"],
        size=meta["image_size"],
        num_classes=num_classes,
        class_names=tuple(meta.get("class_names") or ()),
    )
    conditional = sample_set.labels is not None
    if dry_run:
        print_config(sections)
        print(
            f"{STAGE}: would score {sample_set.n} images of {samples} ({sample_set.dtype}, "
            f"{'with' if conditional else 'without'} labels)"
        )
        return {}
    evaluator = load_evaluator(root / EVALUATOR, device=device).float()
    if conditional and evaluator.num_classes != num_classes:
        raise ValueError(
            f"{EVALUATOR} has {evaluator.num_classes} classes but the prepared data {num_classes}: "
            "re-run train_evaluator"
        )
    reference = load_reference(root / EVALUATOR)
    print(f"{STAGE}: scoring {sample_set.n} images of {samples}", file=sys.stderr, flush=True)
    scorer = SampleScorer(
        evaluator,
        image_shape=sample_set.shape,
        num_classes=num_classes,
        accuracy=conditional,
        grid_columns=cfg.grid_columns,
        source=str(samples),
    )
    report = progress_line(str(samples), file=sys.stderr)
    tic = time.perf_counter()
    for images, labels in sample_set.batches(cfg.batch_size):
        scorer.add(images, labels)
        report(scorer.n, sample_set.n, time.perf_counter() - tic)
    real = real_features(evaluator, real_test_images(root, cfg), batch_size=cfg.batch_size)
    metrics = scorer.metrics(
        test_stats=reference.test, real_features=real, floor=reference.floor, pr_k=cfg.pr_k
    )
    result = {"samples": str(samples), "model": model, "metrics": metrics}
    if model is not None:  # the stage's own figures for that model, for comparison
        path = root / REPORTS / f"{model}.json"
        stage = json.loads(path.read_text()) if path.is_file() else None
        result["registered"] = MODELS[model]
        result["stage"] = {k: stage[k] for k in metrics if k in stage} if stage else None
    print(json.dumps(result, sort_keys=True))
    if out is not None:
        write_json(out, result)
        print(f"{STAGE}: -> {out}", file=sys.stderr)
    return result
