"""The "prior" generator family: a token prior (GPT or MaskGIT) plus the VQGAN that decodes its tokens.

Two-stage sampling of "Taming Transformers" (Esser et al. 2021, sec. 3.2) and MaskGIT (Chang et al.
2022): draw a code grid s ~ p(s | c) from the prior, then x = G(z_q(s)) with the tokenizer's decoder.
`export` writes the prior's weights, its configs and a copy of the tokenizer folder; `load` rebuilds
both from that folder alone (see components/generators.py for the interface).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from components.generators import TOKENIZER_DIR, merge_options, read_generator, sample_labels, save_generator
from components.prior import gpt, maskgit
from components.prior.config import PriorConfig, PriorSamplingConfig, one_line, sampling_config
from components.prior.task import build_prior, check_sizes
from components.tokenizer.config import TokenizerConfig

FAMILY = "prior"
GENERATE = {"gpt": gpt.generate, "maskgit": maskgit.generate}


def check_tokenizer(
    tokenizer_dir: str | Path, *, grid: tuple[int, int], codebook_size: int, image_shape: tuple[int, int, int]
) -> None:
    """One-line error unless the tokenizer turns images of `image_shape` into `grid`s of `codebook_size` codes."""
    path = Path(tokenizer_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {tokenizer_dir} an exported tokenizer?")
    try:
        tok = TokenizerConfig.model_validate(json.loads(path.read_text()))
    except ValidationError as err:
        raise ValueError(f"{path}: {one_line(err)}") from None
    channels, H, W = image_shape
    f = tok.autoencoder.downsample_factor
    if channels != tok.autoencoder.in_channels:
        raise ValueError(
            f"image_shape={tuple(image_shape)} has {channels} channels, the tokenizer {tok.autoencoder.in_channels}"
        )
    if H % f or W % f or (H // f, W // f) != tuple(grid):
        raise ValueError(
            f"grid={tuple(grid)} does not match the tokenizer: images {H}x{W} with downsample factor {f} "
            f"give a {H / f:g}x{W / f:g} grid"
        )
    if codebook_size != tok.codebook_size:
        raise ValueError(f"codebook_size={codebook_size} does not match the tokenizer's {tok.codebook_size}")


def export(
    path: str | Path,
    *,
    state: dict[str, torch.Tensor],
    prior: PriorConfig,
    sampling: PriorSamplingConfig,
    grid: tuple[int, int],
    codebook_size: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    tokenizer_dir: str | Path,
) -> None:
    """Write the prior (weights `state`, configs, trained sampling defaults) and a copy of the tokenizer."""
    check_sizes(grid=grid, codebook_size=codebook_size, num_classes=num_classes)
    check_tokenizer(tokenizer_dir, grid=grid, codebook_size=codebook_size, image_shape=image_shape)
    if num_classes == 0 and sampling.guidance != 1.0:
        raise ValueError(
            f"guidance={sampling.guidance} needs a class-conditional prior; num_classes=0: use 1.0"
        )
    # the weights must fit the architecture the config rebuilds (fails here, not at load)
    build_prior(prior, grid=grid, codebook_size=codebook_size, num_classes=num_classes).load_state_dict(state)
    config = {
        "prior": prior.model_dump(mode="json"),
        "sampling": sampling.model_dump(mode="json"),
        "grid": list(grid),
        "codebook_size": codebook_size,
        "num_classes": num_classes,
        "image_shape": list(image_shape),
    }
    save_generator(path, family=FAMILY, state=state, config=config, tokenizer_dir=tokenizer_dir)


class PriorGenerator:
    """Samples token grids from the prior and decodes them with the carried VQGAN."""

    def __init__(
        self,
        model: torch.nn.Module,
        vqgan: torch.nn.Module,
        *,
        kind: str,
        sampling: PriorSamplingConfig,
        grid: tuple[int, int],
        num_classes: int,
        image_shape: tuple[int, int, int],
    ) -> None:
        self.model, self.vqgan, self.kind, self.grid = model, vqgan, kind, tuple(grid)
        self.device = next(model.parameters()).device
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.default_options: dict[str, Any] = sampling.options(kind)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options over the trained defaults; names, then values (one line naming key and rule)."""
        merged = merge_options(f"{FAMILY}/{self.kind}", self.default_options, options)
        checked = sampling_config(merged)  # the shared limits, through the config's field types
        return {name: getattr(checked, name) for name in merged}

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor | int, *, generator: torch.Generator, **options: Any
    ) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] for labels (n,) int64; an int n draws n from the null class."""
        options = self.check_options(options)
        n, labels = sample_labels(labels, num_classes=self.num_classes)
        tokens = GENERATE[self.kind](
            self.model, n if labels is None else labels, generator=generator, **options
        )
        indices = tokens.view(n, *self.grid)  # (n, N) -> (n, h, w), row-major as in data/tokens
        return self.vqgan.decode_indices(indices).float().clamp(-1.0, 1.0)


def load(model_dir: str | Path, *, device: str | torch.device = "cpu") -> PriorGenerator:
    """Rebuild the generator exported by `export` in `model_dir`, in eval mode on `device`."""
    from components.tokenizer.export import load_vqgan

    model_dir = Path(model_dir)
    state, config = read_generator(model_dir)
    try:
        prior = PriorConfig.model_validate(config["prior"])
        sampling = PriorSamplingConfig.model_validate(config["sampling"])
    except ValidationError as err:
        raise ValueError(f"{model_dir / 'config.json'}: {one_line(err)}") from None
    grid, image_shape = tuple(config["grid"]), tuple(config["image_shape"])
    codebook_size, num_classes = int(config["codebook_size"]), int(config["num_classes"])
    check_tokenizer(
        model_dir / TOKENIZER_DIR, grid=grid, codebook_size=codebook_size, image_shape=image_shape
    )
    model = build_prior(prior, grid=grid, codebook_size=codebook_size, num_classes=num_classes)
    model.load_state_dict(state)
    vqgan = load_vqgan(model_dir / TOKENIZER_DIR, device=device)
    return PriorGenerator(
        model.to(device).eval(),
        vqgan,
        kind=prior.kind,
        sampling=sampling,
        grid=grid,
        num_classes=num_classes,
        image_shape=image_shape,
    )
