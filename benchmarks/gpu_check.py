"""`make gpu-check`: the training loop on a CUDA device with bf16 autocast, for a session lent a GPU.

The lent GPU machine has PyTorch but no Ray, MLflow or DVC, and Ray's wheel alone (79 MB) is over
the device tool's 64 MiB carry limit, so this runs the loop that the Ray adapter runs, in one process
(the loop is Ray-free by design), with the models of ./params.yaml on the built-in digits:

1. evaluator: images/s and peak GPU memory under bf16 autocast, test accuracy (bar: 98%), also at
   batch 1024 (a GPU is idle at batch 64 on 16x16 images);
2. tokenizer (VQGAN, perceptual loss on that evaluator, discriminator phase): images/s, peak memory,
   codebook usage and PSNR on the test split;
3. resume: 2k steps straight and k steps + a resume from the checkpoint give the same weights.

The CPU figures (one torch thread, fp32) come from the same run: ratios, not absolute speeds,
compare across machines. One JSON object is printed and written to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from components.config import load_stage
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.data.readers import ShardDataset, epoch_batches
from components.evaluation.evaluator import EvaluatorTask, predict
from components.evaluation.recon import recon_metrics
from components.tokenizer.config import fit_to_data
from components.tokenizer.task import TokenizerTask
from components.tokenizer.vqgan import reconstruct
from components.training.checkpoint import LocalCheckpointIO
from components.training.loop import train


def timed_train(
    task, *, loop, data: ShardDataset, device: torch.device, checkpoint_io=None, seed: int = 0
) -> dict:
    """Train; wall seconds, images/s of the last log window and peak GPU memory (GiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    metrics = train(
        task,
        loop=loop,
        batches=epoch_batches({"image": data.images, "label": data.labels}, batch=loop.batch_size, seed=0),
        device=device,
        precision="bf16" if device.type == "cuda" else "fp32",
        checkpoint_io=checkpoint_io,
        seed=seed,
        progress=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "wall_s": time.perf_counter() - tic,
        "images_per_s": metrics.get("perf/samples_per_s", float("nan")),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loop_logged_mem_gib": metrics.get("perf/max_mem_gib"),  # what MLflow gets as perf/max_mem_gib
    }


def evaluator_run(cfg, loop, data, test, device) -> tuple[dict, torch.nn.Module]:
    shape = {"in_channels": data.meta["channels"], "num_classes": data.meta["num_classes"]}
    task = EvaluatorTask(cfg.model, loop, **shape)
    out = timed_train(task, loop=loop, data=data, device=device)
    net = task.modules["evaluator"].eval()
    out["test_accuracy"] = float((predict(net, test.images) == test.labels).float().mean())
    return out, net


def tokenizer_run(cfg, loop, data, test, device, evaluator) -> dict:
    frozen = evaluator.to(device).requires_grad_(False)
    model = fit_to_data(cfg.model, channels=data.meta["channels"], image_size=data.meta["image_size"])
    task = TokenizerTask(model, loop, feature_fn=frozen.feature_maps)
    out = timed_train(task, loop=loop, data=data, device=device)
    x_rec, usage = reconstruct(task.modules["vqgan"].eval(), test.images)
    out.update(psnr=recon_metrics(x_rec, test.images)["psnr"], codebook_usage=usage.usage())
    return out


class _Stopped(Exception):
    """Raised after the first checkpoint: the run dies there, as a killed worker would."""


class _StopAfterFirstSave(LocalCheckpointIO):
    def save(self, state, *, step: int, metrics: dict[str, float]) -> None:
        super().save(state, step=step, metrics=metrics)
        raise _Stopped


def resume_run(cfg, loop, data, device, folder: Path) -> dict:
    """Max |w_straight - w_resumed| over the evaluator's weights (0 when resume is exact)."""
    shape = {"in_channels": data.meta["channels"], "num_classes": data.meta["num_classes"]}
    half = loop.steps // 2
    loop = loop.model_copy(update={"checkpoint_every": half})
    torch.backends.cudnn.deterministic = True  # else cuDNN's backward may pick atomics: not bitwise
    straight = EvaluatorTask(cfg.model, loop, **shape)
    timed_train(straight, loop=loop, data=data, device=device)
    with contextlib.suppress(_Stopped):
        timed_train(
            EvaluatorTask(cfg.model, loop, **shape),
            loop=loop,
            data=data,
            device=device,
            checkpoint_io=_StopAfterFirstSave(folder),
        )
    # Another seed: only a real restore (weights, optimizer, RNG, data position) ends where the
    # straight run ends; a run that ignored the checkpoint would start from other weights.
    resumed = EvaluatorTask(cfg.model, loop, **shape)
    io = LocalCheckpointIO(folder)
    timed_train(resumed, loop=loop, data=data, device=device, checkpoint_io=io, seed=1)
    torch.backends.cudnn.deterministic = False
    a, b = straight.modules["evaluator"].state_dict(), resumed.modules["evaluator"].state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"steps": loop.steps, "resumed_at": half, "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of this script)")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of each: checks the script, not the GPU"
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="reports/gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device")
    torch.set_num_threads(1)
    ev = load_stage(args.params, "train_evaluator")["train_evaluator"]
    tok = load_stage(args.params, "train_tokenizer")["train_tokenizer"]

    def scale(n: int) -> int:
        return max(4, n // 50) if args.quick else n

    quick = {"warmup_steps": 0, "log_every": 4} if args.quick else {}
    ev_loop = ev.loop.model_copy(update={"steps": scale(ev.loop.steps), **quick})
    tok_loop = tok.loop.model_copy(update={"steps": scale(tok.loop.steps), **quick})
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory(prefix="genpipe-gpu-check-") as tmp:
        build_dataset(PrepareConfig(), Path(tmp) / "processed", log=lambda *_: None)
        data, test = (
            ShardDataset(Path(tmp) / "processed", "train"),
            ShardDataset(Path(tmp) / "processed", "test"),
        )
        report["evaluator"], evaluator = evaluator_run(ev, ev_loop, data, test, device)
        big = ev_loop.model_copy(update={"batch_size": 1024, "steps": scale(100), "log_every": scale(50)})
        report["evaluator_batch_1024"], _ = evaluator_run(ev, big, data, test, device)
        report["tokenizer"] = tokenizer_run(tok, tok_loop, data, test, device, evaluator)
        cpu = torch.device("cpu")
        ev_cpu = ev_loop.model_copy(update={"steps": scale(100), "log_every": scale(50)})
        report["evaluator_cpu"], cpu_net = evaluator_run(ev, ev_cpu, data, test, cpu)
        tok_cpu = tok_loop.model_copy(update={"steps": scale(40), "log_every": scale(20)})
        report["tokenizer_cpu"] = tokenizer_run(tok, tok_cpu, data, test, cpu, cpu_net)
        report["resume"] = resume_run(
            ev, ev_loop.model_copy(update={"steps": scale(40)}), data, device, Path(tmp) / "ckpt"
        )
    for family in ("evaluator", "tokenizer"):
        report[f"{family}_speedup_over_cpu"] = (
            report[family]["images_per_s"] / report[f"{family}_cpu"]["images_per_s"]
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
