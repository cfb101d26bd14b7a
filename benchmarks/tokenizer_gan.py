"""VQGAN adversarial ablation: the params.yaml tokenizer with the discriminator off (weight 0) and on.

Trains `train_tokenizer` (model and loop of ./params.yaml, 600 steps) in a plain process, one torch
thread, then the default GPT prior on its codes, on two data sets:

- digits: the pipeline's data/processed (16x16 L) and its trained evaluator (models/evaluator);
- shapes: `builtin:shapes` prepared at 32x32 RGB into --work, with an evaluator trained there on the
  params.yaml `train_evaluator` config through the same loop (cached for later runs).

For each run: rFID (Fréchet distance of the reconstructed test split to the real test statistics on
that data's evaluator; the real-vs-real floor is train vs test), PSNR, SSIM, codebook usage, and the
discriminator's accuracy (share of patch logits > 0 on real, < 0 on reconstructed test images) at
the end, next to the last training window's `d_acc_real` / `d_acc_fake`. Then the second stage, as
`encode`, `train_prior gpt` and `evaluate prior_gpt` would do it, in this process: the tokenizer is
saved, the train and val splits are encoded to code grids, params.yaml's `train_prior.gpt` (task,
model, loop, sampling) trains on them, and the exported two-stage generator is judged by the
evaluate stage's judge (N = the train split's size, params.yaml `evaluate` seed, batch and options)
on that data's evaluator: the prior's FID, its ratio to the floor, conditional accuracy,
precision/recall. Tokenizer, tokens and prior stay in <out dir>/runs/<data>-<disc>/. One JSON line
per run is appended to --out. Example: `.venv/bin/python -m benchmarks.tokenizer_gan --data digits --disc off on`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from components.config import load_stage
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.data.readers import ShardDataset, epoch_batches
from components.data.shards import image_shape
from components.evaluation.evaluator import EvaluatorTask, load_evaluator, predict, save_evaluator
from components.evaluation.frechet import feature_stats, frechet_distance
from components.evaluation.judge import judge
from components.evaluation.recon import recon_metrics
from components.evaluation.reference import TEST_STATS, compute_reference, load_reference, save_reference
from components.generators import load_generator
from components.io import save_model
from components.prior.generator import export as export_prior
from components.prior.task import PriorTask
from components.tokenizer.task import TokenizerTask
from components.tokenizer.vqgan import VQGAN, reconstruct
from components.training.checkpoint import LocalCheckpointIO, module_states
from components.training.config import LoopConfig
from components.training.loop import train
from pipelines.score import progress_line

SHAPES = PrepareConfig(source="builtin:shapes", image_size=32, channels=3)
# "on": params.yaml's disc block with taming-transformers' weight 0.8 (the params.yaml default is 0, off);
# "on_group": the same with the GroupNorm discriminator of before
DISC = {"off": {"weight": 0.0}, "on": {"weight": 0.8}, "on_group": {"weight": 0.8, "norm": "group"}}


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


def _with_steps(loop: LoopConfig, steps: int | None) -> LoopConfig:
    """params.yaml's loop, or the same with `steps` (warm-up cut to a tenth of them if it would not fit)."""
    if not steps:
        return loop
    warmup = loop.warmup_steps if loop.warmup_steps < steps else steps // 10
    return LoopConfig.model_validate({**loop.model_dump(), "steps": steps, "warmup_steps": warmup})


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
    save_reference(compute_reference(net, train=data.images, test=test.images), ev_dir)
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


def run(
    name: str,
    disc: str,
    *,
    data_dir: Path,
    ev_dir: Path,
    params: str,
    steps: int | None,
    disc_start: int | None = None,
) -> tuple[dict, VQGAN]:
    """Train one tokenizer and judge it on the test split; (figures, the trained VQGAN in eval mode)."""
    cfg = load_stage(params, "train_tokenizer")["train_tokenizer"]
    data, test = ShardDataset(data_dir, "train"), ShardDataset(data_dir, "test")
    raw = cfg.model.model_dump()
    raw["autoencoder"]["in_channels"] = data.meta["channels"]
    raw["loss"]["disc"].update(DISC[disc] | ({"start_step": disc_start} if disc_start is not None else {}))
    model = type(cfg.model).model_validate(raw)
    loop = _with_steps(cfg.loop, steps)
    evaluator = load_evaluator(ev_dir).requires_grad_(False)
    task = TokenizerTask(model, loop, feature_fn=evaluator.feature_maps)
    print(f"{name}/{disc}: tokenizer, {loop.steps} steps", flush=True)
    tic = time.perf_counter()
    metrics = train(
        task,
        loop=loop,
        batches=_batches(data, loop.batch_size),
        device=torch.device("cpu"),
        sink=_PrintSink(f"{name}/{disc}"),
        progress=True,  # step, it/s and ETA at each log step
    )
    wall = time.perf_counter() - tic
    vqgan = task.modules["vqgan"].eval()
    x_rec, usage = reconstruct(vqgan, test.images)
    reference = load_reference(ev_dir)
    test_stats, floor = reference.test, reference.floor
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
    return out, vqgan


@torch.no_grad()
def encode_split(vqgan: VQGAN, data: ShardDataset, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """A split as the prior's batch columns: "tokens" (N, h, w) int64 and "label" (N,), as `encode` writes them."""
    tokens = torch.cat([vqgan.encode(x)[1] for x in data.images.split(batch_size)])  # (N, h, w)
    return {"tokens": tokens.long(), "label": data.labels.long()}


def prior_fid(
    tag: str, vqgan: VQGAN, *, data_dir: Path, ev_dir: Path, params: str, folder: Path, steps: int | None
) -> dict:
    """Save the tokenizer, encode, train params.yaml's GPT prior on the codes, judge it as `evaluate` does."""
    if folder.exists():
        shutil.rmtree(folder)  # a stale checkpoint would be resumed as if finished
    save_model(folder / "tokenizer", vqgan.state_dict(), vqgan.config_dict())
    data, val, test = (ShardDataset(data_dir, split) for split in ("train", "val", "test"))
    tic = time.perf_counter()
    train_cols, val_cols = encode_split(vqgan, data), encode_split(vqgan, val)
    encode_s = time.perf_counter() - tic
    grid = tuple(train_cols["tokens"].shape[1:])
    num_classes = data.meta["num_classes"]
    shape = image_shape(data.meta)

    # train_prior gpt in this process: the stage's task, model and loop (global batch on one worker)
    cfg = load_stage(params, "train_prior")["train_prior"].gpt
    loop = _with_steps(cfg.loop, steps)
    task = PriorTask(cfg.model, loop, grid=grid, codebook_size=vqgan.codebook_size, num_classes=num_classes)
    io = LocalCheckpointIO(folder / "checkpoints", keep=1)
    print(f"{tag}: prior gpt on {tuple(train_cols['tokens'].shape)} codes, {loop.steps} steps", flush=True)
    tic = time.perf_counter()
    metrics = train(
        task,
        loop=loop,
        batches=epoch_batches(train_cols, batch=loop.batch_size, seed=0),
        val_batches=lambda: [val_cols],  # the whole val split as one batch
        device=torch.device("cpu"),
        checkpoint_io=io,
        progress=True,
    )
    prior_s = time.perf_counter() - tic
    export_prior(
        folder / "prior_gpt",
        state=module_states(io.restore(), ema_module=PriorTask.ema_module)["prior"],
        prior=cfg.model,
        sampling=cfg.sampling,
        grid=grid,
        codebook_size=vqgan.codebook_size,
        num_classes=num_classes,
        image_shape=shape,
        tokenizer_dir=folder / "tokenizer",
    )
    shutil.rmtree(folder / "checkpoints")

    # evaluate prior_gpt: the one judge, on this data's evaluator and test statistics
    ev = load_stage(params, "evaluate")["evaluate"]
    reference = load_reference(ev_dir)
    n = ev.num_samples or len(data)
    tic = time.perf_counter()
    result = judge(
        load_generator(folder / "prior_gpt"),
        evaluator=load_evaluator(ev_dir),
        test_images=test.images,
        test_stats=reference.test,
        floor=reference.floor,
        n=n,
        seed=ev.seed,
        batch_size=ev.batch_size,
        options=ev.options.get("prior_gpt", {}),
        pr_k=ev.pr_k,
        progress=progress_line("judge", stage=tag),
    )
    judge_s = time.perf_counter() - tic
    out = {f"prior_{k}": v for k, v in result.metrics.items()}
    out.update(
        {
            "prior_val_loss": metrics.get("val/loss", float("nan")),
            "prior_steps": loop.steps,
            "prior_encode_s": encode_s,
            "prior_train_s": prior_s,
            "prior_judge_s": judge_s,
        }
    )
    print(f"{tag}: " + json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes"])
    parser.add_argument("--disc", nargs="+", default=list(DISC), choices=list(DISC))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--steps", type=int, default=None, help="override the tokenizer's loop.steps (default: params.yaml)"
    )
    parser.add_argument(
        "--prior-steps", type=int, default=None, help="override the prior's loop.steps (default: params.yaml)"
    )
    parser.add_argument(
        "--disc-start", type=int, default=None, help="override loss.disc.start_step (default: params.yaml)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work", default=".genpipe/bench/tokenizer_gan", help="shapes data and evaluator")
    parser.add_argument("--out", default=".genpipe/bench/tokenizer_gan/results.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    results = []
    for name in args.data:
        if name == "digits":
            data_dir, ev_dir = Path("data/processed"), Path("models/evaluator")
        else:
            data_dir, ev_dir = shapes_evaluator(work, params=args.params)
        for disc in args.disc:
            result, vqgan = run(
                name,
                disc,
                data_dir=data_dir,
                ev_dir=ev_dir,
                params=args.params,
                steps=args.steps,
                disc_start=args.disc_start,
            )
            result |= prior_fid(
                f"{name}/{disc}",
                vqgan,
                data_dir=data_dir,
                ev_dir=ev_dir,
                params=args.params,
                folder=out.parent / "runs" / f"{name}-{disc}",
                steps=args.prior_steps,
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            results.append(result)
    return results


if __name__ == "__main__":
    main()
