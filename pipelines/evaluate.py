"""Stage `evaluate MODEL`: the one judge of every generator (DVC `evaluate@<model>`).

Loads `models/<model>` through the generator interface alone, samples N class-balanced images on
fixed seeds (N = the train split's size by default) and scores them on the evaluator's features
against the real test statistics: `reports/evaluate/<model>.json` and a grid with one row per class,
`reports/evaluate/<model>.png`. When the model is registered, the figures become metrics of its
version's run and logged model (the MLflow Models tab's leaderboard), one JSON tag on the version and
its model card (components/registry/card.py), and the version becomes the `challenger`. Training
stages never sample this set.

Samples stream through the judge batch by batch (components/evaluation/scorer.py): no set is held
whole. `--dump-samples FILE.npz` writes exactly the set the stage judges (images and the labels asked
for) and prints its figures, touching neither reports/ nor the registry; `--samples PATH` scores a
set made elsewhere (pipelines/score.py) with the same judge, evaluator and floor.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.config import load_stage
from components.data.shards import image_shape
from components.evaluation.evaluator import load_evaluator
from components.evaluation.grid import make_grid, save_png
from components.evaluation.judge import judge
from components.evaluation.reference import load_reference
from components.evaluation.samples import SampleWriter
from components.generators import MODELS, load_generator
from components.io import write_json
from components.stages import EvaluateConfig
from pipelines.lineage import dvc_data_hash, repo_root
from pipelines.runtime import print_config, tracking_uri
from pipelines.score import (
    DATA,
    EVALUATOR,
    REPORTS,
    STAGE,
    progress_line,
    real_test_images,
    score_samples,
    setup,
)


def main(
    *,
    params: Path,
    model: str | None = None,
    samples: str | Path | None = None,
    out: str | Path | None = None,
    dump_samples: str | Path | None = None,
    dry_run: bool = False,
) -> None:
    if samples is not None:
        if dump_samples is not None:
            raise ValueError("--dump-samples writes a generator's set; it does not go with --samples")
        score_samples(params=params, samples=Path(samples), model=model, out=out, dry_run=dry_run)
        return
    if out is not None:
        raise ValueError("--out goes with --samples; the stage writes reports/evaluate/MODEL.json")
    if model is None:
        raise ValueError("name a MODEL to judge (one of: " + ", ".join(MODELS) + ") or give --samples PATH")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    sections = load_stage(params, STAGE)
    cfg: EvaluateConfig = sections[STAGE]
    root = repo_root()
    meta, device = setup(cfg, root=root, workers=cfg.num_workers > 0)
    generator = load_generator(root / "models" / model, device=device)
    evaluator = load_evaluator(root / EVALUATOR, device=device)
    if tuple(generator.image_shape) != image_shape(meta):
        raise ValueError(
            f"models/{model} makes images of shape {tuple(generator.image_shape)} but the prepared data is "
            f"{image_shape(meta)}: retrain it on this data"
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
    reference = load_reference(root / EVALUATOR)
    print(f"{STAGE}: {model}: sampling {n} images ({options or 'trained defaults'})")

    runner = None
    if cfg.num_workers:  # FID-50k and up: the jobs on Ray actors (pipelines/judge_ray.py)
        from pipelines.judge_ray import ray_runner

        runner = ray_runner(
            sections["ray"],
            num_workers=cfg.num_workers,
            model_dir=root / "models" / model,
            evaluator_dir=root / EVALUATOR,
            device=cfg.device,
            threads=cfg.threads or 1,
            seed=cfg.seed,
            options=options,
            accuracy=generator.num_classes > 0 and evaluator.num_classes == generator.num_classes,
            per_row=cfg.grid_columns,
        )

    def run(sink=None):
        return judge(
            generator,
            evaluator=evaluator.float(),
            test_images=real_test_images(root, cfg),
            test_stats=reference.test,
            floor=reference.floor,
            n=n,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            options=options,
            pr_k=cfg.pr_k,
            progress=progress_line(model),
            grid_columns=cfg.grid_columns,
            sink=sink,
            runner=runner,
        )

    if dump_samples is not None:
        labels = generator.num_classes > 0
        with SampleWriter(dump_samples, n=n, shape=generator.image_shape, labels=labels) as writer:
            result = run(writer)
        print(
            json.dumps({"model": model, "dump": str(dump_samples), "metrics": result.metrics}, sort_keys=True)
        )
        print(f"{STAGE}: {model}: {n} judged samples -> {dump_samples} (reports/ and the registry untouched)")
        return
    result = run()
    metrics = result.metrics
    save_png(make_grid(result.grid, nrow=cfg.grid_columns), root / REPORTS / f"{model}.png")
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


def judged_data() -> tuple[str, str]:
    """(name, digest) of the data the figures are measured on: data/processed (its test split) and its DVC md5."""
    name, _, md5 = dvc_data_hash([DATA]).partition(":")
    return name, md5


def register_judgement(sections, *, root: Path, model: str, metrics: dict[str, float], options: dict) -> None:
    """Figures onto the registered version (found by the weights' sha256), its run and logged model; it becomes challenger."""
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
        dataset=judged_data(),
    )
    if version is None:
        print(f"{STAGE}: note: models/{model} is not registered in {uri}; figures only in {REPORTS}/")
    else:
        print(f"{STAGE}: {name} version {version} is the challenger")
