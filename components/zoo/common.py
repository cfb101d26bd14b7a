"""What the classic families share: label handling, shape checks, the export/load layout.

Labels: a batch's "label" is a class in 0..K-1 or -1 (unlabelled). A conditional model embeds
K + 1 rows: row K stands for "no label", so partially labelled data trains the same network.
Unconditional models (K = 0) ignore labels. An exported folder's config.json holds
{"family", "model": <the family's config>, "image_shape": [C, H, W], "num_classes": K,
"sampling": <default options>}; `model.safetensors` holds the sampling module's weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from components.generators import merge_options, read_generator, sample_labels, save_generator
from components.sampling_limits import check_option
from components.schema import StrictConfig
from components.training.config import LoopConfig

C = TypeVar("C", bound=StrictConfig)
G = TypeVar("G", bound="ZooGenerator")


def embedding_rows(num_classes: int) -> int:
    """Rows of a class embedding: K classes plus the "no label" row; 0 when unconditional."""
    if num_classes < 0:
        raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")
    return num_classes + 1 if num_classes else 0


def label_rows(labels: torch.Tensor | None, *, num_classes: int) -> torch.Tensor | None:
    """Embedding row per label (-1 -> K), None when unconditional; labels >= K are an error."""
    if num_classes == 0 or labels is None:
        return None
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1} or be -1 (unlabelled), "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels).long()


def request(
    labels: torch.Tensor | int, *, num_classes: int, generator: torch.Generator, device: torch.device
) -> tuple[int, torch.Tensor | None]:
    """(n, embedding rows or None) for a sample call.

    `n` asked of a conditional model draws the classes uniformly from `generator` (a sample of the
    class-marginal mixture), rather than using the untrained "no label" row.
    """
    n, y = sample_labels(labels, num_classes=num_classes)
    if y is None and num_classes > 0:
        y = torch.randint(num_classes, (n,), generator=generator, device=generator.device)
    return n, None if y is None else y.to(device)


def adamw(module: torch.nn.Module, loop: LoopConfig) -> dict[str, torch.optim.Optimizer]:
    """The one "main" optimizer of a likelihood family: AdamW with the loop's lr, betas, decay."""
    return {
        "main": torch.optim.AdamW(
            module.parameters(), lr=loop.lr, betas=loop.betas, weight_decay=loop.weight_decay
        )
    }


def progress_labels(n: int, *, num_classes: int, device: torch.device) -> torch.Tensor | None:
    """Labels 0, 1, .., K-1, 0, .. for a progress grid; None when unconditional."""
    return torch.arange(n, device=device) % num_classes if num_classes else None


def randn(shape: tuple[int, ...], *, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved (same seed, same samples)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def marginal_nll(
    nll_given: Callable[[torch.Tensor | None], torch.Tensor],
    *,
    n: int,
    num_classes: int,
    device: torch.device,
) -> torch.Tensor:
    """-log p(x) (n,) in nats of the class-marginal p(x) = (1/K) sum_y p(x|y); nll(x) if unconditional.

    The likelihood of images alone (what `bits_per_dim` gets) under the same uniform class mixture
    that `n` unlabelled samples draw from; for a bound -log p(x|y) <= B_y it stays a bound.
    """
    if num_classes == 0:
        return nll_given(None)
    per_class = torch.stack(
        [nll_given(torch.full((n,), k, dtype=torch.long, device=device)) for k in range(num_classes)]
    )  # (K, n)
    return math.log(num_classes) - torch.logsumexp(-per_class, dim=0)


def check_image_shape(
    image_shape: tuple[int, ...], *, multiple: int, family: str, why: str
) -> tuple[int, int, int]:
    """(C, H, W) as ints; H and W must be positive multiples of `multiple`."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(
            f"{family}: image_shape must be (C, H, W) of positive sizes, got {tuple(image_shape)}"
        )
    c, h, w = (int(s) for s in image_shape)
    if h % multiple or w % multiple:
        raise ValueError(f"{family}: image size {h}x{w} must be a multiple of {multiple} ({why})")
    return c, h, w


def check_sampling_option(name: str, value: Any, *, family: str) -> Any:
    """Option `name` checked against the shared limits; the one-line error names the family."""
    try:
        return check_option(name, value)
    except ValueError as err:
        raise ValueError(f"{family}: {err}") from None


class ZooGenerator:
    """A loaded classic-family generator: its network in eval mode, one sampling knob, `draw`.

    A family subclasses it with `option` (the knob's name, checked against the shared limits) and
    `draw(y, *, n, generator, <option>)`; likelihood families add `bits_per_dim`.
    """

    option: str  # "temperature" or "truncation"

    def __init__(self, net: torch.nn.Module, *, family: str, default_options: dict[str, Any]) -> None:
        self.net, self.family = net, family
        self.num_classes, self.image_shape = net.num_classes, net.image_shape
        self.default_options = dict(default_options)
        self.device = next(net.parameters()).device

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The knob over its default, within the shared limit (one-line errors naming the family)."""
        opts = merge_options(self.family, self.default_options, options)
        return {
            **opts,
            self.option: check_sampling_option(self.option, opts[self.option], family=self.family),
        }

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor | int, *, generator: torch.Generator, **options: Any
    ) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] for `labels` (or `n` draws over the classes)."""
        value = self.check_options(options)[self.option]
        n, y = request(labels, num_classes=self.num_classes, generator=generator, device=self.device)
        return self.draw(y, n=n, generator=generator, **{self.option: value})

    def draw(
        self, y: torch.Tensor | None, *, n: int, generator: torch.Generator, **option: Any
    ) -> torch.Tensor:
        raise NotImplementedError


def export_zoo(
    path: str | Path,
    *,
    family: str,
    state: dict[str, torch.Tensor],
    config: StrictConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    sampling: dict[str, Any],
) -> None:
    """Write the folder `load_zoo` reads back (see the module docstring for the layout); the default
    sampling options are checked against the shared limits first."""
    for name, value in sampling.items():
        check_sampling_option(name, value, family=family)
    save_generator(
        path,
        family=family,
        state=state,
        config={
            "model": config.model_dump(mode="json"),
            "image_shape": [int(s) for s in image_shape],
            "num_classes": int(num_classes),
            "sampling": dict(sampling),
        },
    )


def load_zoo(
    model_dir: str | Path,
    *,
    device: torch.device,
    config_cls: type[C],
    network: Callable[..., torch.nn.Module],
    generator_cls: type[G],
) -> G:
    """Rebuild an exported family: `network(cfg, image_shape=, num_classes=)` with the saved weights,
    in eval mode on `device`, wrapped in `generator_cls`."""
    state, raw = read_generator(model_dir)
    missing = [k for k in ("model", "image_shape", "num_classes", "sampling") if k not in raw]
    if missing:
        raise ValueError(
            f"{Path(model_dir) / 'config.json'}: missing {', '.join(missing)}; re-export the model"
        )
    cfg = config_cls(**raw["model"])
    net = network(
        cfg, image_shape=tuple(int(s) for s in raw["image_shape"]), num_classes=int(raw["num_classes"])
    )
    net.load_state_dict(state)
    return generator_cls(net.to(device).eval(), family=raw["family"], default_options=dict(raw["sampling"]))
