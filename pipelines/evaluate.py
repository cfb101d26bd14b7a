"""Stage `evaluate MODEL`: the one judge of every generator (DVC `evaluate@<model>`).

Loads `models/<model>` through the generator interface alone, samples N class-balanced images on
fixed seeds (N = the train split's size by default) and scores them on the evaluator's features
against the real test statistics: `reports/evaluate/<model>.json` and a grid with one row per class,
`reports/evaluate/<model>.png`. When the model is registered, the figures go into its version's run
and tags, and the version becomes the `challenger`. Training stages never sample this set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from components.config import load_stage
from components.data.readers import ShardDataset
from components.data.shards import read_meta
from components.evaluation.evaluator import load_evaluator
from components.evaluation.grid import make_grid, save_png
from components.evaluation.judge import class_rows, judge
from components.evaluation.reference import load_reference
from components.generators import MODELS, load_generator
from components.io import write_json
from components.stages import EvaluateConfig
from pipelines.lineage import repo_root
from pipelines.runtime import print_config, tracking_uri

STAGE = "evaluate"
DATA, EVALUATOR = "data/processed", "models/evaluator"
REPORTS = "reports/evaluate"


def main(*, params: Path, model: str, dry_run: bool = False) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    sections = load_stage(params, STAGE)
    cfg: EvaluateConfig = sections[STAGE]
    root = repo_root()
    meta = read_meta(root / DATA)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluate.device=cuda but no CUDA device is visible; set evaluate.device: cpu")
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = torch.device(cfg.device)
    generator = load_generator(root / "models" / model, device=device)
    evaluator = load_evaluator(root / EVALUATOR, device=device)
    if tuple(generator.image_shape) != (meta["channels"], meta["image_size"], meta["image_size"]):
        raise ValueError(
            f"models/{model} makes images of shape {tuple(generator.image_shape)} but the prepared data is "
            f"{(meta['channels'], meta['image_size'], meta['image_size'])}: retrain it on this data"
        )
    options = cfg.options.get(model, {})
    try:  # params validation checked names and ranges; the model checks them against its defaults
        generator.check_options(options)
    except ValueError as err:
        raise ValueError(f"evaluate.options.{model}: {err}") from None
    n = cfg.num_samples or meta["counts"]["train"]
    if dry_run:
        print_config(sections)
        print(f"{STAGE}: would sample {n} images from models/{model} with options {options or 'defaults'}")
        return
    test = ShardDataset(root / DATA, "test")
    reference = load_reference(root / EVALUATOR)
    print(f"{STAGE}: {model}: sampling {n} images ({options or 'trained defaults'})")
    result = judge(
        generator,
        evaluator=evaluator.float(),
        test_images=test.images,
        test_stats=reference.test,
        floor=reference.floor,
        n=n,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        options=options,
        pr_k=cfg.pr_k,
        progress=_progress(model),
    )
    metrics = result.metrics
    grid = make_grid(
        class_rows(result.images, result.labels, num_classes=generator.num_classes, per_row=cfg.grid_columns),
        nrow=cfg.grid_columns,
    )
    save_png(grid, root / REPORTS / f"{model}.png")
    write_json(root / REPORTS / f"{model}.json", metrics)
    register_judgement(sections, root=root, model=model, metrics=metrics, options=options)
    shown = ", ".join(
        f"{k} {metrics[k]:.4g}"
        for k in (
            "fid",
            "fid_over_floor",
            "cond_accuracy",
            "precision",
            "recall",
            "nfe",
            "images_per_s",
            "bits_per_dim",
        )
        if k in metrics
    )
    print(f"{STAGE}: {MODELS[model]}: {shown} -> {REPORTS}/{model}.json, {REPORTS}/{model}.png")


def _progress(model: str):
    """Periodic lines with rate and ETA (a line per ~10% of the set)."""
    last = [-1]

    def report(done: int, total: int, seconds: float) -> None:
        tenth = done * 10 // total
        if tenth == last[0] and done < total:
            return
        last[0] = tenth
        rate = done / max(seconds, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        print(f"{STAGE}: {model}: {done}/{total} images | {rate:.0f} images/s | ETA {eta:.0f}s", flush=True)
        sys.stdout.flush()

    return report


def register_judgement(sections, *, root: Path, model: str, metrics: dict[str, float], options: dict) -> None:
    """Figures into the registered version's run and tags (found by the weights' sha256); it becomes challenger."""
    if not sections["mlflow"].register_models:
        return
    from components.registry.registry import record_judgement

    uri, name = tracking_uri(sections["mlflow"]), MODELS[model]
    version = record_judgement(
        tracking_uri=uri,
        name=name,
        model_dir=root / "models" / model,
        evaluator_dir=root / EVALUATOR,
        metrics=metrics,
        options=options,
        artifact=root / REPORTS / f"{model}.png",
    )
    if version is None:
        print(f"{STAGE}: note: models/{model} is not registered in {uri}; figures only in {REPORTS}/")
    else:
        print(f"{STAGE}: {name} version {version} is the challenger")
