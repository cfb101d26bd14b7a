"""VQGAN adversarial ablation: the params.yaml tokenizer with the discriminator off (weight 0) and on.

Trains `train_tokenizer` (model and loop of ./params.yaml, 600 steps) in a plain process, one torch
thread, on two data sets:

- digits: the pipeline's data/processed (16x16 L) and its trained evaluator (models/evaluator);
- shapes: `builtin:shapes` prepared at 32x32 RGB into --work, with an evaluator trained there on the
  params.yaml `train_evaluator` config through the same loop (cached for later runs).

For each run: rFID (Fréchet distance of the reconstructed test split to the real test statistics on
that data's evaluator; the real-vs-real floor is train vs test), PSNR, SSIM, codebook usage, and the
discriminator's accuracy (share of patch logits > 0 on real, < 0 on reconstructed test images) at
the end, next to the last training window's `d_acc_real` / `d_acc_fake`. One JSON line per run is
appended to --out. Example: `.venv/bin/python -m benchmarks.tokenizer_gan --data digits --disc off on`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from components.config import load_stage
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.data.readers import ShardDataset, epoch_batches
from components.evaluation.evaluator import EvaluatorTask, load_evaluator, predict, save_evaluator
from components.evaluation.frechet import FeatureStats, feature_stats, frechet_distance
from components.evaluation.recon import recon_metrics
from components.tokenizer.task import TokenizerTask
from components.tokenizer.vqgan import reconstruct
from components.training.loop import train

TEST_STATS, TRAIN_STATS = "test_stats.safetensors", "train_stats.safetensors"
SHAPES = PrepareConfig(source="builtin:shapes", image_size=32, channels=3)
# "on": params.yaml's disc block as it is; "on_group": the same with the GroupNorm discriminator of before
DISC = {"off": {"weight": 0.0}, "on": {}, "on_group": {"norm": "group"}}


class _PrintSink:
    """The discriminator's diagnostics on stdout at each log step (rank 0 of a plain process)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def log(self, metrics: dict[str, float], step: int) -> None:
        keys = [k for k in sorted(metrics) if k.startswith("discriminator/") or k.startswith("val/")]
        if keys:
            print(self.tag, step, " ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in keys), flush=True)

    def last_step(self) -> int:
        return -1

    def close(self) -> None:
        pass


def _batches(data: ShardDataset, batch: int):
    return epoch_batches({"image": data.images, "label": data.labels}, batch=batch, seed=0)


def shapes_evaluator(work: Path, *, params: str) -> tuple[Path, Path]:
    """Prepare builtin:shapes at 32x32 RGB and train its evaluator once; (data dir, evaluator dir)."""
    data_dir, ev_dir = work / "shapes32", work / "shapes32_evaluator"
    if not (data_dir / "meta.json").is_file():
        build_dataset(SHAPES, data_dir, log=print)
    if (ev_dir / TEST_STATS).is_file():
        return data_dir, ev_dir
    cfg = load_stage(params, "train_evaluator")["train_evaluator"]
    data, test = ShardDataset(data_dir, "train"), ShardDataset(data_dir, "test")
    task = EvaluatorTask(cfg.model, cfg.loop, in_channels=3, num_classes=data.meta["num_classes"])
    tic = time.perf_counter()
    train(
        task,
        loop=cfg.loop,
        batches=_batches(data, cfg.loop.batch_size),
        device=torch.device("cpu"),
        progress=False,
    )
    net = task.modules["evaluator"].eval()
    accuracy = float((predict(net, test.images) == test.labels).float().mean())
    print(f"shapes evaluator: test accuracy {accuracy:.4f} in {time.perf_counter() - tic:.0f}s", flush=True)
    save_evaluator(net, ev_dir)
    feature_stats(net, test.images).save(ev_dir / TEST_STATS)
    feature_stats(net, data.images).save(ev_dir / TRAIN_STATS)
    return data_dir, ev_dir


@torch.no_grad()
def disc_accuracy(task: TokenizerTask, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Share of patch logits > 0 on real and < 0 on reconstructed images (0.5/0.5: chance)."""
    disc = task.modules.get("discriminator")
    if disc is None:
        return {}
    was_training = disc.training
    disc.eval()
    r = torch.cat([disc(x) for x in real.split(256)])
    f = torch.cat([disc(x) for x in fake.split(256)])
    disc.train(was_training)
    return {
        "test_d_acc_real": float((r > 0).float().mean()),
        "test_d_acc_fake": float((f < 0).float().mean()),
    }


def run(name: str, disc: str, *, data_dir: Path, ev_dir: Path, params: str, steps: int | None) -> dict:
    """Train one tokenizer and judge it on the test split."""
    cfg = load_stage(params, "train_tokenizer")["train_tokenizer"]
    data, test = ShardDataset(data_dir, "train"), ShardDataset(data_dir, "test")
    raw = cfg.model.model_dump()
    raw["autoencoder"]["in_channels"] = data.meta["channels"]
    raw["loss"]["disc"].update(DISC[disc])
    model = type(cfg.model).model_validate(raw)
    loop = cfg.loop.model_copy(update={"steps": steps} if steps else {})
    evaluator = load_evaluator(ev_dir).requires_grad_(False)
    task = TokenizerTask(model, loop, feature_fn=evaluator.feature_maps)
    tic = time.perf_counter()
    metrics = train(
        task,
        loop=loop,
        batches=_batches(data, loop.batch_size),
        device=torch.device("cpu"),
        sink=_PrintSink(f"{name}/{disc}"),
        progress=False,
    )
    wall = time.perf_counter() - tic
    vqgan = task.modules["vqgan"].eval()
    x_rec, usage = reconstruct(vqgan, test.images)
    test_stats = FeatureStats.load(ev_dir / TEST_STATS)
    floor = frechet_distance(FeatureStats.load(ev_dir / TRAIN_STATS), test_stats)
    out = {
        "data": name,
        "disc": disc,
        "disc_config": model.loss.disc.model_dump(),
        "steps": loop.steps,
        "wall_s": wall,
        **recon_metrics(x_rec, test.images),
        "rfid": frechet_distance(feature_stats(evaluator, x_rec), test_stats),
        "rfid_floor": floor,
        "codebook_usage": usage.usage(),
        "perplexity": usage.perplexity(),
        **disc_accuracy(task, test.images, x_rec),
        **{k: v for k, v in metrics.items() if k.startswith("discriminator/") or k == "generator/d_weight"},
    }
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes"])
    parser.add_argument("--disc", nargs="+", default=list(DISC), choices=list(DISC))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override loop.steps (default: params.yaml)")
    parser.add_argument("--work", default=".genpipe/bench/tokenizer_gan", help="shapes data and evaluator")
    parser.add_argument("--out", default=".genpipe/bench/tokenizer_gan/results.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    results = []
    for name in args.data:
        if name == "digits":
            data_dir, ev_dir = Path("data/processed"), Path("models/evaluator")
        else:
            data_dir, ev_dir = shapes_evaluator(work, params=args.params)
        for disc in args.disc:
            result = run(name, disc, data_dir=data_dir, ev_dir=ev_dir, params=args.params, steps=args.steps)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
            results.append(result)
    return results


if __name__ == "__main__":
    main()
