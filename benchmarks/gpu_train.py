"""One generator trained on a CUDA device without Ray, MLflow or DVC, then judged there as `evaluate` does.

For a session lent a GPU (BENCHMARKS.md, "GPU check": that machine has PyTorch but no Ray): how far a
preset's model goes when training is not what a 2-core CPU affords (#21: is the 32x32 RGB preset
short of capacity, or of steps?). The model is sized, trained, exported and judged by the same
components as `genpipe repro`; only the Ray Train worker group and the tracking are missing.

`--seconds` sizes the run: a short calibration measures steps/s on the device, then the run trains
`loop.steps = rate x seconds` (the LR schedule needs its length up front). `--steps` fixes it instead.

    python -m benchmarks.gpu_train --workspace W --model diffusion_pixel --seconds 180 \\
        --set train_diffusion.pixel.loop.batch_size=256 --judge '{}' --judge '{"guidance": 3}' --out OUT

W is a workspace after `genpipe repro` (params.yaml, data/processed, models/evaluator; data/tokens
and models/tokenizer for latent diffusion and the priors). Writes OUT/<model>.json (the run and one
judgement per `--judge` options), OUT/<model>.png (the first judgement's grid) and OUT/<model>.tar
(the exported model folder, to judge again with `genpipe evaluate` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from components import catalog
from components.config import load_stage
from components.data.readers import ShardDataset, epoch_batches
from components.data.shards import image_shape, read_meta
from components.data.tokens import read_token_meta, read_tokens
from components.diffusion.generator import export as export_diffusion
from components.diffusion.sizing import latent_scaling, network, task_for
from components.evaluation.batches import SplitImages
from components.evaluation.evaluator import load_evaluator
from components.evaluation.grid import make_grid, save_png
from components.evaluation.judge import judge
from components.evaluation.reference import load_reference
from components.generators import load_generator
from components.io import write_json
from components.prior.generator import export as export_prior
from components.prior.task import PriorTask
from components.stages import EvaluateConfig
from components.training.checkpoint import LocalCheckpointIO, module_states
from components.training.loop import train

EVALUATOR = catalog.model("evaluator").folder
JUDGE_BATCH = EvaluateConfig().batch_size  # the evaluate stage's default
FAMILIES = ("diffusion_pixel", "diffusion_latent", "prior_gpt", "prior_maskgit")


def with_sets(params: Path, sets: list[str], out: Path) -> Path:
    """A copy of `params` with each `dotted.key=yaml value` of `sets` applied."""
    tree = yaml.safe_load(params.read_text())
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"gpu_train: --set {item!r} is not KEY=VALUE")
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    out.write_text(yaml.safe_dump(tree, sort_keys=False))
    return out


def recipe(name: str, params: Path, ws: Path):
    """(task factory, loop, {"train", "val"} columns, export(module states, folder), EMA module name),
    as the model's stage builds them."""
    spec = catalog.model(name)
    cfg = getattr(load_stage(params, spec.stage)[spec.stage], spec.variant)
    tokenizer_dir = ws / catalog.TOKENIZER
    if name == "diffusion_pixel":
        meta = read_meta(ws / spec.data)
        split = {s: ShardDataset(ws / spec.data, s) for s in ("train", "val")}
        columns = {s: {"image": d.images, "label": d.labels} for s, d in split.items()}
    else:
        meta = read_token_meta(ws / spec.data)
        arrays = {s: read_tokens(ws / spec.data, s) for s in ("train", "val")}
        key = "latent" if name == "diffusion_latent" else "tokens"
        columns = {
            s: {key: torch.from_numpy(a[key]), "label": torch.from_numpy(a["label"])}
            for s, a in arrays.items()
        }
    if name.startswith("diffusion"):
        model, latent = network(cfg, spec.variant, meta)
        if latent is not None:
            latent["mean"], latent["std"] = latent_scaling(ws / spec.data, model)

        def export(states: dict, out: Path) -> None:
            export_diffusion(
                out,
                denoiser_state=states["denoiser"],
                model=model,
                sampling=cfg.sampling,
                image_shape=image_shape(meta),
                num_classes=meta["num_classes"],
                latent=latent,
                tokenizer_dir=tokenizer_dir if latent else None,
            )

        return task_for(cfg, model, meta, latent), cfg.loop, columns, export, "denoiser"
    grid = tuple(meta["grid"])

    def factory():
        return PriorTask(
            cfg.model,
            cfg.loop,
            grid=grid,
            codebook_size=meta["codebook_size"],
            num_classes=meta["num_classes"],
        )

    def export(states: dict, out: Path) -> None:
        export_prior(
            out,
            state=states["prior"],
            prior=cfg.model,
            sampling=cfg.sampling,
            grid=grid,
            codebook_size=meta["codebook_size"],
            num_classes=meta["num_classes"],
            image_shape=image_shape(meta),
            tokenizer_dir=tokenizer_dir,
        )

    return factory, cfg.loop, columns, export, PriorTask.ema_module


def fit(factory, loop, columns, *, device, steps: int, ckpt: Path | None) -> dict:
    """`steps` of the stage's loop on `device` under bf16 autocast (CUDA) from the first batch."""
    loop = loop.model_copy(
        update={
            "steps": steps,
            "val_every": steps,
            "checkpoint_every": steps,
            "log_every": max(1, min(loop.log_every, steps // 4)),
        }
    )
    val = columns["val"]
    return train(
        factory(),
        loop=loop,
        batches=epoch_batches(columns["train"], batch=loop.batch_size, seed=0),
        val_batches=lambda: epoch_batches(val, batch=min(loop.batch_size, len(val["label"])), seed=1)(0),
        device=device,
        precision="bf16" if device.type == "cuda" else "fp32",
        checkpoint_io=LocalCheckpointIO(ckpt) if ckpt else None,
        progress=True,
    )


def judged(
    model_dir: Path, ws: Path, *, device, judgements: list[dict], n: int | None
) -> Iterator[tuple[dict, torch.Tensor]]:
    """The evaluate stage's figures for the exported model, once per options in `judgements` (each over
    the trained defaults); the model, the evaluator and the reference are loaded once."""
    generator = load_generator(model_dir, device=device)
    evaluator = load_evaluator(ws / EVALUATOR, device=device).float()
    reference = load_reference(ws / EVALUATOR)
    n = n or read_meta(ws / catalog.IMAGES)["counts"]["train"]
    for options in judgements:
        generator.check_options(options)
        result = judge(
            generator,
            evaluator=evaluator,
            test_images=SplitImages(ws / catalog.IMAGES, "test", batch_size=JUDGE_BATCH),
            test_stats=reference.test,
            floor=reference.floor,
            n=n,
            seed=0,
            batch_size=JUDGE_BATCH,
            options=options,
        )
        yield {**result.metrics, "options": options, "n": n}, result.grid


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--model", choices=FAMILIES, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, help="training budget: steps from a calibrated rate")
    parser.add_argument("--steps", type=int, help="training steps (instead of --seconds)")
    parser.add_argument("--calibrate", type=int, default=60, help="steps of the rate calibration")
    parser.add_argument("--set", action="append", default=[], help="params KEY=VALUE (dotted), repeatable")
    parser.add_argument("--judge", action="append", default=[], help="sampling options (JSON) to judge with")
    parser.add_argument("--num-samples", type=int, help="images judged (default: the train split's size)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if (args.seconds is None) == (args.steps is None):
        raise SystemExit("gpu_train: give one of --seconds or --steps")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_train: --device cuda but torch sees no CUDA device")
    spec = catalog.model(args.model)
    needed = ["params.yaml", catalog.IMAGES, EVALUATOR, spec.data] + (
        [catalog.TOKENIZER] if spec.data != catalog.IMAGES else []
    )
    missing = [name for name in dict.fromkeys(needed) if not (args.workspace / name).exists()]
    if missing:
        raise SystemExit(
            f"gpu_train: {args.workspace} lacks {', '.join(missing)}: run `genpipe repro` there first"
        )
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": args.model, "device": str(device), "sets": args.set}
    with tempfile.TemporaryDirectory(prefix="genpipe-gpu-train-") as tmp:
        tmp = Path(tmp)
        params = with_sets(args.workspace / "params.yaml", args.set, tmp / "params.yaml")
        factory, loop, columns, export, ema_module = recipe(args.model, params, args.workspace)
        steps = args.steps
        if steps is None:
            calibration = fit(factory, loop, columns, device=device, steps=args.calibrate, ckpt=None)
            rate = calibration["perf/samples_per_s"] / loop.batch_size  # the last log window: warm
            steps = max(args.calibrate, int(rate * args.seconds))
            report["calibrated_steps_per_s"] = rate
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tic = time.perf_counter()
        metrics = fit(factory, loop, columns, device=device, steps=steps, ckpt=tmp / "ckpt")
        report["train"] = {
            "steps": steps,
            "batch_size": loop.batch_size,
            "train_s": time.perf_counter() - tic,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else None,
            **{k: float(v) for k, v in metrics.items()},
        }
        state = LocalCheckpointIO(tmp / "ckpt").restore()
        folder = tmp / args.model
        export(module_states(state, ema_module=ema_module), folder)
        with tarfile.open(args.out / f"{args.model}.tar", "w") as tar:
            tar.add(folder, arcname=args.model)
        report["judged"] = []
        judgements = [json.loads(options) for options in args.judge or ["{}"]]
        results = judged(folder, args.workspace, device=device, judgements=judgements, n=args.num_samples)
        for i, (options, (metrics, grid)) in enumerate(zip(judgements, results, strict=True)):
            report["judged"].append(metrics)
            if i == 0:
                save_png(make_grid(grid, nrow=10), args.out / f"{args.model}.png")
            write_json(args.out / f"{args.model}.json", report)
            print(
                f"gpu_train: {args.model} {options}: "
                + json.dumps(
                    {
                        k: metrics[k]
                        for k in ("fid_over_floor", "cond_accuracy", "precision", "recall", "images_per_s")
                        if k in metrics
                    }
                )
            )
    return report


if __name__ == "__main__":
    main()
