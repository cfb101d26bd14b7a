"""Stage `train_evaluator`: the classifier whose features every later metric and perceptual loss uses.

Nothing may be downloaded, so the pipeline trains its own feature network on the prepared data and
keeps the feature statistics of the real train and test splits next to it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from components.config import load_stage
from components.data.readers import ShardDataset
from components.data.shards import read_meta
from components.evaluation.evaluator import Evaluator, EvaluatorTask, predict, save_evaluator
from components.evaluation.reference import compute_reference, save_reference
from components.io import atomic_dir
from components.stages import TrainEvaluatorConfig
from pipelines.runtime import CLOCK, print_config, repo_root, stage_run
from pipelines.training import finish, ray_lineage, ray_run_name, train_on_ray

STAGE = "train_evaluator"
DATA = "data/processed"
OUT = "models/evaluator"
METRICS = "reports/train_evaluator.json"
CURVES = "reports/plots/train_evaluator.csv"


def main(*, params: Path, dry_run: bool = False) -> None:
    sections = load_stage(params, STAGE)
    cfg: TrainEvaluatorConfig = sections[STAGE]
    root = repo_root()
    meta = read_meta(root / DATA)
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    if dry_run:
        print_config(sections)
        return
    shape = {"in_channels": meta["channels"], "num_classes": meta["num_classes"]}
    run_name = ray_run_name(STAGE, sections, data_deps=[DATA])
    with stage_run(STAGE, sections, data_deps=[DATA], resume_key=run_name) as run:
        result = train_on_ray(
            stage=STAGE,
            sections=sections,
            run=run,
            task_factory=partial(EvaluatorTask, cfg.model, cfg.loop, **shape),
            loop=cfg.loop,
            data_dir=root / DATA,
            run_name=run_name,
        )
        evaluator = result.load_module(
            "evaluator", Evaluator.from_config(cfg.model, **shape), ema_module=EvaluatorTask.ema_module
        )
        metrics = export(evaluator, data_dir=root / DATA, out=root / OUT)
        finish(
            run,
            family="evaluator",
            model_dir=root / OUT,
            metrics=metrics,
            metrics_path=root / METRICS,
            curves_path=root / CURVES,
            register_model=sections["mlflow"].register_models,
            tags=ray_lineage(run_name, sections),
        )
    print(
        f"{STAGE}: test accuracy {metrics['test_accuracy']:.4f}, real-vs-real FD floor "
        f"{metrics['fid_floor']:.4f} -> {OUT}"
    )
    print(CLOCK.line(STAGE))


@torch.no_grad()
def export(evaluator: Evaluator, *, data_dir: Path, out: Path) -> dict[str, float]:
    """Test accuracy, feature statistics of the real splits, and the model files, written atomically."""
    test, train = ShardDataset(data_dir, "test"), ShardDataset(data_dir, "train")
    accuracy = float((predict(evaluator, test.images) == test.labels).float().mean())
    reference = compute_reference(evaluator, train=train.images, test=test.images)
    with atomic_dir(out) as tmp:
        save_evaluator(evaluator, tmp)
        save_reference(reference, tmp)
    return {"test_accuracy": accuracy, "fid_floor": reference.floor}
