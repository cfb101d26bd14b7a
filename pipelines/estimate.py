"""What a training stage will cost, said before it starts: one estimate line, and one note when the
data is larger or richer than the params were sized for.

The estimate scales a measured run of the same stage: default params on the built-in digits (16x16
grey, 10 classes), one CPU worker on the 2-core reference machine, nothing else running
(BENCHMARKS.md, "make run on a fresh clone", session 6), by steps x batch x the FLOPs of one
training step per sample (3x the forward of every update phase, counted by torch's
FlopCounterMode on a two-sample synthetic batch); workers split the batch. It is a rough figure:
small networks on a CPU pay a per-step overhead that FLOPs do not see, that machine's speed varied
by ~20% between runs, other work on it slows every stage, and a GPU is much faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components import catalog
from components.catalog import ModelSpec
from components.data.shards import read_meta
from components.data.tokens import read_token_meta
from components.schema import StrictConfig
from components.training.config import LoopConfig

#: The data every default is sized for: the built-in digits as prepared by default.
SIZED_FOR = {"channels": 1, "image_size": 16, "num_classes": 10}
RICHER = 2.0  # the note: the data has this many times the values or classes, with less than ...
SAME_SIZE = 2.0  # ... this many times the reference's parameters and its training samples (steps x batch)
BACKWARD = 3.0  # forward + backward ~ 3x the forward FLOPs (the backward is not run: half the counting)
OVERHEAD_S = 15.4  # median start-up + export per training stage at the reference (session 6)


@dataclass(frozen=True)
class Reference:
    """A measured default run: training seconds, steps, global batch, parameters, FLOPs per sample."""

    train_s: float
    steps: int
    batch: int
    params: int
    flops: float


#: models/<name> -> its default run (parameters and FLOPs per sample of one training step counted as
#: below, on 1x16x16 images, 4x4 token grids of 128 codes, 8x4x4 latents, 10 classes).
REFERENCES = {
    "evaluator": Reference(20.3, 500, 64, 304_682, 57.17e6),
    "tokenizer": Reference(106.1, 600, 32, 983_849, 430.33e6),  # with the perceptual loss's evaluator
    "diffusion_pixel": Reference(63.1, 450, 64, 300_641, 93.31e6),
    "diffusion_latent": Reference(17.0, 300, 128, 253_384, 17.03e6),
    "prior_gpt": Reference(23.8, 400, 64, 433_024, 40.11e6),
    "prior_maskgit": Reference(20.6, 400, 64, 433_280, 42.67e6),
    "vae": Reference(16.7, 250, 64, 109_554, 51.17e6),
    "gan": Reference(10.4, 220, 128, 276_170, 19.19e6),
    "wgan": Reference(12.2, 160, 64, 276_170, 32.58e6),
    "flow": Reference(23.0, 200, 128, 306_232, 19.41e6),
    "pixelcnn": Reference(34.3, 180, 64, 128_512, 117.96e6),
}


def synthetic_batch(spec: ModelSpec, meta: dict, *, n: int = 2) -> dict:
    """`n` random training rows shaped as the stage's reader yields them (images or tokens+latents)."""
    import torch

    g = torch.Generator().manual_seed(0)  # its own generator: the driver's random state is left alone
    k = meta["num_classes"]
    label = torch.arange(n) % k if k else torch.full((n,), -1)
    if spec.data != catalog.TOKENS:
        c, s = meta["channels"], meta["image_size"]
        return {"image": torch.rand(n, c, s, s, generator=g) * 2 - 1, "label": label}
    (h, w), d = meta["grid"], meta["latent_channels"]
    tokens = torch.randint(0, 2, (n, h, w), generator=g)
    return {"tokens": tokens, "latent": torch.randn(n, d, h, w, generator=g), "label": label}


def step_cost(task_factory: Callable[[], object], batch: dict) -> tuple[int, float]:
    """(parameters, FLOPs per sample of one training step: every phase's forward, x3 for its backward).

    Built on the CPU, unwrapped; the driver's random state is left as it was (the weight init and
    the step draw from a forked generator)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    n = len(batch["label"])
    with torch.random.fork_rng(devices=[]):
        task = task_factory()
        task.build(device=torch.device("cpu"), wrap=lambda m: m)
        params = sum(p.numel() for m in task.modules.values() for p in m.parameters())
        with FlopCounterMode(display=False) as counter:
            for phase in task.phases:
                task.step(phase.name, batch, step=0)
    return params, BACKWARD * counter.get_total_flops() / n


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@dataclass(frozen=True)
class Estimate:
    """A stage's estimated training seconds (None: none made) and the lines that say it."""

    seconds: float | None
    lines: list[str]


def estimate_lines(
    spec: ModelSpec,
    sections: dict[str, StrictConfig],
    *,
    loop: LoopConfig,
    task_factory: Callable[[], object],
    data_dir: Path,
) -> list[str]:
    """The estimate line, plus the note when the data outgrows the params ([] for an unknown model)."""
    if spec.name not in REFERENCES:
        return []
    meta = read_token_meta(data_dir) if spec.data == catalog.TOKENS else read_meta(data_dir)
    return estimate(spec, sections, loop=loop, task_factory=task_factory, meta=meta).lines


def estimate(
    spec: ModelSpec,
    sections: dict[str, StrictConfig],
    *,
    loop: LoopConfig,
    task_factory: Callable[[], object],
    meta: dict,
) -> Estimate:
    """The estimate for data described by `meta` (data/processed's or data/tokens' meta.json keys)."""
    ref = REFERENCES.get(spec.name)
    if ref is None:
        return Estimate(None, [])
    try:
        params, flops = step_cost(task_factory, synthetic_batch(spec, meta))
    except Exception as err:  # the estimate must never stop a stage: training reports its own errors
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}" if str(err) else type(err).__name__
        return Estimate(None, [f"{spec.command}: no estimate ({why})"])
    train = sections["train"]
    scale = (loop.steps / ref.steps) * (loop.batch_size / ref.batch) * (flops / ref.flops)
    seconds = ref.train_s * scale / train.num_workers
    size = f"{meta['channels']}x{meta['image_size']}x{meta['image_size']}"
    where = "GPU: far less" if train.use_gpu else f"{train.num_workers} CPU worker(s)"
    lines = [
        f"{spec.command}: estimate ~{_duration(seconds)} of training + ~{_duration(OVERHEAD_S)} start-up "
        f"({loop.steps} steps x {loop.batch_size} of {size}, {params / 1e6:.2f}M parameters, "
        f"{flops / 1e6:.0f} MFLOP per sample, {where}; "
        f"scaled from the default's {ref.train_s:.0f} s on digits)"
    ]
    values = meta["channels"] * meta["image_size"] ** 2
    sized = SIZED_FOR["channels"] * SIZED_FOR["image_size"] ** 2
    richer = values >= RICHER * sized or meta["num_classes"] >= RICHER * SIZED_FOR["num_classes"]
    # grown: capacity or training length (samples seen) raised for the data, as the rgb32 preset does
    grown = max(params / ref.params, (loop.steps * loop.batch_size) / (ref.steps * ref.batch))
    if richer and grown < SAME_SIZE:
        lines.append(
            f"{spec.command}: note: the data ({size}, {meta['num_classes']} classes) is {values / sized:.0f}x "
            f"the values per image the params were sized for (1x16x16 digits, 10 classes), at "
            f"{params / ref.params:.1f}x their parameters: expect weak samples; give "
            f"{spec.stage}{'.' + spec.variant if spec.variant else ''} more capacity and steps "
            f"(for 32x32 RGB: `genpipe preset rgb32`, docs/own-images.md)"
        )
    return Estimate(seconds + OVERHEAD_S, lines)
