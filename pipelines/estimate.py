"""What a training stage will cost, said before it starts: one estimate line, and one note when the
data is larger or richer than the params were sized for.

Each stage's step time is a line in the FLOPs of one step (global batch x FLOPs per sample: 3x the
forward of every update phase, counted by torch's FlopCounterMode on a two-sample synthetic batch):
a per-step overhead (data, logging, optimizer, Python: what FLOPs do not see, and what dominates a
small network on a CPU) plus FLOPs at a rate. The line goes through two measured runs of the stage
on the 2-core reference machine, one CPU worker, nothing else running (`make calibrate`,
benchmarks/calibrate.py): its shipped params on the built-in digits (16x16 grey, 10 classes), and the
rgb32 preset on the built-in glyphs (32x32 RGB, 24 classes). Workers split the batch. It is a rough
figure: that machine's speed varied by up to ~1.5x between days, other work on it slows every stage,
and a GPU is much faster.
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
class Run:
    """A measured run: training seconds (first to last step), steps, global batch, parameters, FLOPs
    per sample of one training step."""

    train_s: float
    steps: int
    batch: int
    params: int
    flops: float

    @property
    def step_s(self) -> float:
        return self.train_s / self.steps

    @property
    def step_flops(self) -> float:
        return self.batch * self.flops


@dataclass(frozen=True)
class Reference:
    """A stage's two measured runs: shipped params on digits, the rgb32 preset on glyphs.

    A step costs `overhead_s` plus its FLOPs at `seconds_per_flop`: the line through both runs. Where
    that line would cross zero above zero FLOPs (MaskGIT, PixelCNN: their step time grows ~10% faster
    than their FLOPs), the overhead is taken as 0 and the line goes through the rgb32 run."""

    digits: Run
    rgb32: Run

    @property
    def overhead_s(self) -> float:
        """Seconds a step costs beyond its FLOPs (the line's value at zero FLOPs, at least 0)."""
        d, r = self.digits, self.rgb32
        slope = (r.step_s - d.step_s) / (r.step_flops - d.step_flops)
        return max(0.0, d.step_s - slope * d.step_flops)

    @property
    def seconds_per_flop(self) -> float:
        return (self.rgb32.step_s - self.overhead_s) / self.rgb32.step_flops

    def step_seconds(self, step_flops: float) -> float:
        """One step's seconds when a worker's share of the step is `step_flops`."""
        return self.overhead_s + self.seconds_per_flop * step_flops


#: models/<name> -> its two measured runs (`make calibrate`, session 17, the 2-core machine idle; the
#: rgb32 runs at a quarter of the preset's steps, at least 100; the VAE's rgb32 run is session 18's
#: whole preset run, its network changed then, measured by train_zoo alone). Parameters and FLOPs are counted as
#: below: digits on 1x16x16 images, 4x4 token grids of 128 codes, 8x4x4 latents, 10 classes; glyphs
#: on 3x32x32, 8x8 grids of 256 codes, 8x8x8 latents, 24 classes.
REFERENCES = {
    "evaluator": Reference(Run(13.9, 500, 64, 304_682, 57.17e6), Run(26.9, 250, 64, 307_064, 231.92e6)),
    "tokenizer": Reference(Run(76.4, 600, 32, 983_849, 430.33e6), Run(123.7, 300, 32, 985_003, 1738.21e6)),
    "diffusion_pixel": Reference(
        Run(44.7, 450, 64, 300_641, 93.31e6), Run(133.9, 300, 48, 674_931, 847.88e6)
    ),
    "diffusion_latent": Reference(
        Run(9.4, 300, 128, 253_384, 17.03e6), Run(210.8, 625, 128, 2_434_424, 312.26e6)
    ),
    "prior_gpt": Reference(Run(16.2, 400, 64, 433_024, 40.11e6), Run(73.1, 250, 64, 870_272, 339.74e6)),
    "prior_maskgit": Reference(Run(13.7, 400, 64, 433_280, 42.67e6), Run(78.2, 250, 64, 870_528, 345.45e6)),
    "vae": Reference(Run(9.5, 250, 64, 109_554, 51.17e6), Run(778.0, 2000, 64, 1_357_638, 825.38e6)),
    "gan": Reference(Run(9.4, 220, 128, 276_170, 19.19e6), Run(141.9, 1100, 128, 759_236, 142.58e6)),
    "wgan": Reference(Run(8.7, 160, 64, 276_170, 32.58e6), Run(209.6, 800, 64, 759_236, 252.73e6)),
    "flow": Reference(Run(18.3, 200, 128, 306_232, 19.41e6), Run(31.4, 100, 128, 2_023_856, 359.94e6)),
    "pixelcnn": Reference(Run(23.7, 180, 64, 128_512, 117.96e6), Run(92.3, 100, 64, 509_824, 754.97e6)),
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
    seconds = loop.steps * ref.step_seconds(loop.batch_size * flops / train.num_workers)
    size = f"{meta['channels']}x{meta['image_size']}x{meta['image_size']}"
    where = "GPU: far less" if train.use_gpu else f"{train.num_workers} CPU worker(s)"
    lines = [
        f"{spec.command}: estimate ~{_duration(seconds)} of training + ~{_duration(OVERHEAD_S)} start-up "
        f"({loop.steps} steps x {loop.batch_size} of {size}, {params / 1e6:.2f}M parameters, "
        f"{flops / 1e6:.0f} MFLOP per sample, {where}; "
        f"fitted to measured runs: {ref.digits.step_s * 1e3:.0f} ms a step on digits, "
        f"{ref.rgb32.step_s * 1e3:.0f} ms with the rgb32 preset)"
    ]
    values = meta["channels"] * meta["image_size"] ** 2
    sized = SIZED_FOR["channels"] * SIZED_FOR["image_size"] ** 2
    richer = values >= RICHER * sized or meta["num_classes"] >= RICHER * SIZED_FOR["num_classes"]
    # grown: capacity or training length (samples seen) raised for the data, as the rgb32 preset does
    base = ref.digits
    grown = max(params / base.params, (loop.steps * loop.batch_size) / (base.steps * base.batch))
    if richer and grown < SAME_SIZE:
        lines.append(
            f"{spec.command}: note: the data ({size}, {meta['num_classes']} classes) is {values / sized:.0f}x "
            f"the values per image the params were sized for (1x16x16 digits, 10 classes), at "
            f"{params / base.params:.1f}x their parameters: expect weak samples; give "
            f"{spec.stage}{'.' + spec.variant if spec.variant else ''} more capacity and steps "
            f"(for 32x32 RGB: `genpipe preset rgb32`, docs/own-images.md)"
        )
    return Estimate(seconds + OVERHEAD_S, lines)
