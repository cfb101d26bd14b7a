"""What a training stage will cost, said before it starts: one estimate line, and one note when the
data is larger or richer than the params were sized for.

The estimate scales a measured run of the same stage: default params on the built-in digits (16x16
grey, 10 classes), one CPU worker on the 2-core reference machine, nothing else running
(BENCHMARKS.md, "make run on a fresh clone", session 6). A step of a network costs about its
parameter count times the positions it runs at, so the training time scales with
steps x batch x parameters x values per input (pixels, tokens or latent values); workers split the
batch. It is a rough figure: that machine's speed varied by ~20% between runs, other work on it
slows every stage, and a GPU is much faster than the CPU it was measured on.
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
RICHER = 2.0  # the note: the data has this many times the values or classes, at no more than ...
SAME_SIZE = 2.0  # ... this many times the reference parameters
OVERHEAD_S = 15.4  # median start-up + export per training stage at the reference (session 6)


@dataclass(frozen=True)
class Reference:
    """A measured default run: training seconds, steps, global batch, parameters, values per input."""

    train_s: float
    steps: int
    batch: int
    params: int
    numel: int


#: models/<name> -> its default run (parameters counted from the built task; numel: 1x16x16 images,
#: 4x4 token grids, 8x4x4 latents).
REFERENCES = {
    "evaluator": Reference(20.3, 500, 64, 304_682, 256),
    "tokenizer": Reference(106.1, 600, 32, 983_849, 256),
    "diffusion_pixel": Reference(63.1, 450, 64, 300_641, 256),
    "diffusion_latent": Reference(17.0, 300, 128, 253_384, 128),
    "prior_gpt": Reference(23.8, 400, 64, 433_024, 16),
    "prior_maskgit": Reference(20.6, 400, 64, 433_280, 16),
    "vae": Reference(16.7, 250, 64, 109_554, 256),
    "gan": Reference(10.4, 220, 128, 276_170, 256),
    "wgan": Reference(12.2, 160, 64, 276_170, 256),
    "flow": Reference(23.0, 200, 128, 306_232, 256),
    "pixelcnn": Reference(34.3, 180, 64, 128_512, 256),
}


def parameter_count(task_factory: Callable[[], object]) -> int:
    """Parameters of every module the stage's task builds (on the CPU, unwrapped); the driver's
    random state is left as it was (its weight init draws from a forked generator)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        task = task_factory()
        task.build(device=torch.device("cpu"), wrap=lambda m: m)
        return sum(p.numel() for m in task.modules.values() for p in m.parameters())


def input_numel(spec: ModelSpec, meta: dict) -> int:
    """Values per training input: image pixels, the token grid (priors) or the latent (latent diffusion)."""
    if spec.data != catalog.TOKENS:
        return meta["channels"] * meta["image_size"] ** 2
    h, w = meta["grid"]
    return h * w if spec.name.startswith("prior") else meta["latent_channels"] * h * w


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def estimate_lines(
    spec: ModelSpec,
    sections: dict[str, StrictConfig],
    *,
    loop: LoopConfig,
    task_factory: Callable[[], object],
    data_dir: Path,
) -> list[str]:
    """The estimate line, plus the note when the data outgrows the params ([] for an unknown model)."""
    ref = REFERENCES.get(spec.name)
    if ref is None:
        return []
    meta = read_token_meta(data_dir) if spec.data == catalog.TOKENS else read_meta(data_dir)
    params, numel = parameter_count(task_factory), input_numel(spec, meta)
    train = sections["train"]
    scale = (
        (loop.steps / ref.steps) * (loop.batch_size / ref.batch) * (params * numel) / (ref.params * ref.numel)
    )
    seconds = ref.train_s * scale / train.num_workers
    size = f"{meta['channels']}x{meta['image_size']}x{meta['image_size']}"
    where = "GPU: far less" if train.use_gpu else f"{train.num_workers} CPU worker(s)"
    lines = [
        f"{spec.command}: estimate ~{_duration(seconds)} of training + ~{_duration(OVERHEAD_S)} start-up "
        f"({loop.steps} steps x {loop.batch_size} of {size}, {params / 1e6:.2f}M parameters, {where}; "
        f"scaled from the default's {ref.train_s:.0f} s on digits)"
    ]
    values = meta["channels"] * meta["image_size"] ** 2
    sized = SIZED_FOR["channels"] * SIZED_FOR["image_size"] ** 2
    richer = values >= RICHER * sized or meta["num_classes"] >= RICHER * SIZED_FOR["num_classes"]
    if richer and params <= SAME_SIZE * ref.params:
        lines.append(
            f"{spec.command}: note: the data ({size}, {meta['num_classes']} classes) is {values / sized:.0f}x "
            f"the values per image the params were sized for (1x16x16 digits, 10 classes), at "
            f"{params / ref.params:.1f}x their parameters: expect weak samples; give "
            f"{spec.stage}{'.' + spec.variant if spec.variant else ''} more capacity and steps "
            f"(a 32x32 RGB preset is planned: issue #21)"
        )
    return lines
