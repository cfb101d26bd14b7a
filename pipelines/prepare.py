"""Stage `prepare`: the configured image source -> Parquet shards + meta.json in data/processed/."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from components.config import load_stage
from components.data.build import build_dataset, plan_dataset
from components.data.config import PrepareConfig
from components.io import write_json
from pipelines.lineage import repo_root
from pipelines.ray_start import init_ray
from pipelines.runtime import print_config, stage_run

OUT_DIR = "data/processed"
METRICS = "reports/prepare.json"
SAMPLES = "reports/prepare_samples.png"
METRIC_KEYS = ("num_train", "num_val", "num_test", "num_classes", "num_skipped")
# A source of this many images or more is converted by Ray Data tasks (spread over the cluster's
# CPUs); below it, in the stage process: no Ray start for the default digits. Override: the env var.
RAY_FROM_ENV, RAY_FROM = "GENPIPE_PREPARE_RAY_FROM", 50_000


def ray_from() -> int:
    """The image count from which prepare converts on Ray Data (GENPIPE_PREPARE_RAY_FROM overrides)."""
    raw = os.environ.get(RAY_FROM_ENV, str(RAY_FROM))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{RAY_FROM_ENV}={raw!r} is not an integer image count") from None


def preflight(cfg: PrepareConfig) -> PrepareConfig:
    """Check inputs before any work: a path source must exist; it is made absolute (repo-relative)."""
    path = cfg.source_path
    if path is None:
        return cfg
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = repo_root() / p
    if not p.exists():
        raise FileNotFoundError(f"prepare.source={cfg.source!r}: {p} does not exist")
    if cfg.source_kind == "imagefolder" and not p.is_dir():
        raise NotADirectoryError(f"prepare.source={cfg.source!r}: {p} is not a directory")
    _check_dvc_dep(cfg, p)
    return cfg.model_copy(update={"source": f"{cfg.source_kind}:{p}"})


def _check_dvc_dep(cfg: PrepareConfig, source: Path) -> None:
    """A path source must be what dvc.yaml's prepare stage depends on (`${prepare.dvc_dep}`), or DVC
    would not notice its files change."""
    dep = Path(cfg.dvc_dep)
    if (dep if dep.is_absolute() else repo_root() / dep).resolve() != source.resolve():
        path = source if cfg.source_path.startswith("~") else cfg.source_path  # DVC does not expand ~
        raise ValueError(
            f"prepare.dvc_dep={cfg.dvc_dep!r} but prepare.source={cfg.source!r}: set prepare.dvc_dep: {path} "
            f"(the prepare stage's DVC dependency, so DVC re-runs it when the images change)"
        )


def main(*, params: Path, dry_run: bool = False) -> None:
    sections = load_stage(params, "prepare")
    cfg: PrepareConfig = sections["prepare"]
    cfg = preflight(cfg)
    plan = plan_dataset(cfg, log=print)  # every refusal that needs no pixels, before the MLflow run
    if dry_run:
        print_config(sections)
        return
    root = repo_root()
    with stage_run("prepare", sections) as run:
        report = build_dataset(
            cfg,
            root / OUT_DIR,
            log=print,
            ray_from=ray_from(),
            start_ray=partial(init_ray, sections["ray"]),
            plan=plan,
        )
        metrics = {k: float(report[k]) for k in METRIC_KEYS}
        write_json(root / METRICS, metrics)
        run.log_metrics(metrics)
        run.log_artifact(root / OUT_DIR / "meta.json")
        _sample_grid(root / OUT_DIR, root / SAMPLES)
        run.log_artifact(root / SAMPLES)
    print(
        f"prepare: {int(metrics['num_train'])} train / {int(metrics['num_val'])} val / "
        f"{int(metrics['num_test'])} test images, {int(metrics['num_classes'])} classes -> {OUT_DIR}"
    )


def _sample_grid(data_dir: Path, out: Path, n: int = 64) -> None:
    """A grid of the first `n` prepared training images, for a person to look at (reads only those)."""
    import pyarrow.parquet as pq
    import torch

    from components.data.images import pngs_to_array
    from components.data.shards import read_meta, split_files
    from components.evaluation.grid import make_grid, save_png

    meta = read_meta(data_dir)
    pngs: list[bytes] = []
    for path in split_files(data_dir, "train"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=n, columns=["image"]):
            pngs += batch.column("image").to_pylist()[: n - len(pngs)]
            if len(pngs) == n:
                break
        if len(pngs) == n:
            break
    images = torch.from_numpy(pngs_to_array(pngs, channels=meta["channels"], size=meta["image_size"]))
    save_png(make_grid(images, nrow=8), out)
