"""Stage `train_tokenizer`: a VQGAN on data/processed, judged by PSNR, rFID and codebook usage.

The perceptual loss and rFID both use the pipeline's own evaluator (models/evaluator): nothing is
downloaded. Reconstructions of the test split are compared with the real test statistics that
`train_evaluator` stored, so rFID sits on the same scale as its real-vs-real floor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from components import catalog
from components.config import load_stage
from components.data.shards import read_meta
from components.evaluation.batches import SplitImages
from components.evaluation.evaluator import load_evaluator
from components.evaluation.frechet import frechet_distance
from components.evaluation.grid import make_grid, save_png
from components.evaluation.recon import ReconScore
from components.evaluation.reference import load_reference
from components.io import model_files, save_model
from components.stages import TrainTokenizerConfig
from components.tokenizer.base import CodeUsage
from components.tokenizer.config import TokenizerConfig, fit_to_data
from components.tokenizer.task import TokenizerTask
from components.tokenizer.vqgan import VQGAN, reconstruct
from pipelines.lineage import repo_root
from pipelines.runtime import print_config
from pipelines.timing import StageClock
from pipelines.training import train_model

STAGE = "train_tokenizer"
SPEC = catalog.model("tokenizer")
DATA, (EVALUATOR,) = SPEC.data, SPEC.inputs
GRID = "reports/train_tokenizer_recon.png"


class EvaluatorFeatureMaps:
    """Picklable `feature_fn` for the perceptual loss: the frozen evaluator, loaded on first use from
    its files' bytes (components.io.model_files), so a worker on a node without models/ has it."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self._net = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._net is None or next(self._net.parameters()).device != x.device:
            self._net = load_evaluator(self.files, device=x.device).requires_grad_(False)
        return self._net.feature_maps(x)

    def __getstate__(self) -> dict:
        return {"files": self.files, "_net": None}


def fit_model(cfg: TrainTokenizerConfig, meta: dict) -> TokenizerConfig:
    """The VQGAN config sized for the prepared data (components/tokenizer/config.py: fit_to_data)."""
    return fit_to_data(
        cfg.model,
        channels=meta["channels"],
        image_size=meta["image_size"],
        grid=cfg.token_grid,
        key=f"{STAGE}.model.autoencoder",
        grid_key=f"{STAGE}.token_grid",
    )


def task_for(
    cfg: TrainTokenizerConfig, model: TokenizerConfig, features: Callable | None
) -> partial[TokenizerTask]:
    """The stage's task factory for `model` (fit_model's); `features` serve the perceptual loss, when on."""
    return partial(
        TokenizerTask, model, cfg.loop, feature_fn=features if cfg.model.loss.perceptual_weight > 0 else None
    )


def main(*, params: Path, dry_run: bool = False, clock: StageClock | None = None) -> None:
    sections = load_stage(params, STAGE)
    cfg: TrainTokenizerConfig = sections[STAGE]
    root = repo_root()
    meta = read_meta(root / DATA)
    model = fit_model(cfg, meta)
    f = model.autoencoder.downsample_factor
    print(
        f"{STAGE}: {meta['image_size']}x{meta['image_size']}x{meta['channels']} images -> "
        f"{meta['image_size'] // f}x{meta['image_size'] // f} tokens (downsampling x{f}, "
        f"channel_mult {list(model.autoencoder.channel_mult)})"
    )
    cfg.loop.per_worker_batch(sections["train"].num_workers)
    evaluator_dir = root / EVALUATOR
    load_evaluator(evaluator_dir)  # fail now, not in a worker, when it is missing
    if dry_run:
        print_config(sections)
        return

    def export(result, out: Path) -> dict[str, float]:
        vqgan = result.load_module("vqgan", VQGAN(model), ema_module=TokenizerTask.ema_module)
        metrics, grid = judge(vqgan, data_dir=root / DATA, evaluator_dir=evaluator_dir, num_grid=cfg.num_grid)
        save_model(out, vqgan.state_dict(), vqgan.config_dict())
        save_png(grid, root / GRID)
        return metrics

    metrics = train_model(
        SPEC,
        sections,
        task_factory=task_for(cfg, model, EvaluatorFeatureMaps(model_files(evaluator_dir))),
        loop=cfg.loop,
        export=export,
        artifacts=(root / GRID,),
        clock=clock,
    )
    print(
        f"{STAGE}: psnr {metrics['psnr']:.2f} dB, rFID {metrics['rfid']:.4f} "
        f"({metrics['rfid_over_floor']:.2f}x the real-vs-real floor), codebook usage "
        f"{metrics['codebook_usage']:.1%}, perplexity {metrics['perplexity']:.1f} -> {SPEC.folder}"
    )


@torch.no_grad()
def judge(vqgan: VQGAN, *, data_dir: Path, evaluator_dir: Path, num_grid: int):
    """Reconstruction metrics on the test split, streamed batch by batch (memory: one batch), and a
    grid of originals over reconstructions."""
    score, usage = ReconScore(load_evaluator(evaluator_dir), keep=num_grid), CodeUsage(vqgan.codebook_size)
    for x in SplitImages(data_dir, "test"):
        score.update(x, reconstruct(vqgan, x, usage=usage)[0])
    reference = load_reference(evaluator_dir)
    rfid = frechet_distance(score.stats(), reference.test)
    metrics = {
        **score.metrics(),
        "rfid": rfid,
        "rfid_over_floor": rfid / max(reference.floor, 1e-12),
        "codebook_usage": usage.usage(),
        "perplexity": usage.perplexity(),
    }
    originals, recons = score.pairs()
    rows = []
    for i in range(0, len(originals), 8):  # originals above their reconstructions, 8 per row
        rows += [originals[i : i + 8], recons[i : i + 8]]
    return metrics, make_grid(torch.cat(rows), nrow=8)
