"""Stage `train_evaluator`: the classifier whose features every later metric and perceptual loss uses.

Nothing may be downloaded, so the pipeline trains its own feature network on the prepared data and
keeps the feature statistics of the real train and test splits next to it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from components import catalog
from components.config import load_stage
from components.data.shards import read_meta
from components.evaluation.batches import LabelledSplit
from components.evaluation.evaluator import Evaluator, EvaluatorTask, predict, save_evaluator
from components.evaluation.reference import reference_from_data, save_reference
from components.io import atomic_dir
from components.stages import TrainEvaluatorConfig
from pipelines.lineage import repo_root
from pipelines.runtime import print_config
from pipelines.timing import StageClock
from pipelines.training import train_model

STAGE = "train_evaluator"
SPEC = catalog.model("evaluator")
DATA = SPEC.data


def task_for(cfg: TrainEvaluatorConfig, meta: dict) -> partial[EvaluatorTask]:
    """The stage's task factory on data described by `meta` (the stage and `genpipe repro --dry-run`)."""
    return partial(
        EvaluatorTask, cfg.model, cfg.loop, in_channels=meta["channels"], num_classes=meta["num_classes"]
    )


def main(*, params: Path, dry_run: bool = False, clock: StageClock | None = None) -> None:
    sections = load_stage(params, STAGE)
    cfg: TrainEvaluatorConfig = sections[STAGE]
    root = repo_root()
    meta = read_meta(root / DATA)
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    if dry_run:
        print_config(sections)
        return
    shape = {"in_channels": meta["channels"], "num_classes": meta["num_classes"]}

    def export_evaluator(result, out: Path) -> dict[str, float]:
        evaluator = result.load_module(
            "evaluator", Evaluator.from_config(cfg.model, **shape), ema_module=EvaluatorTask.ema_module
        )
        return export(evaluator, data_dir=root / DATA, out=out)

    metrics = train_model(
        SPEC,
        sections,
        task_factory=task_for(cfg, meta),
        loop=cfg.loop,
        export=export_evaluator,
        clock=clock,
    )
    print(
        f"{STAGE}: test accuracy {metrics['test_accuracy']:.4f}, real-vs-real FD floor "
        f"{metrics['fid_floor']:.4f} -> {SPEC.folder}"
    )


@torch.no_grad()
def export(evaluator: Evaluator, *, data_dir: Path, out: Path) -> dict[str, float]:
    """Test accuracy, feature statistics of the real splits, and the model files, written atomically.

    Both stream shard by shard: no split is held whole, whatever its size.
    """
    right = total = 0
    for images, labels in LabelledSplit(data_dir, "test"):
        right += int((predict(evaluator, images) == labels).sum())
        total += len(labels)
    accuracy = right / total if total else float("nan")
    reference = reference_from_data(evaluator, data_dir)
    with atomic_dir(out) as tmp:
        save_evaluator(evaluator, tmp)
        save_reference(reference, tmp)
    return {"test_accuracy": accuracy, "fid_floor": reference.floor}
