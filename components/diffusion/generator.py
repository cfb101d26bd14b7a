"""The "diffusion" family of the generator interface: export a trained denoiser, load it, sample.

config.json holds the DiffusionConfig (`model`), the trained SamplingConfig (`sampling`), the image
shape, the class count and, for latent diffusion (Rombach et al. 2022), the latent statistics and
shape; the tokenizer that decodes the latents travels in `tokenizer/`. Sampling options are the
SamplingConfig's fields, validated with the same one-line errors and validity table as at training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from components.diffusion.config import DiffusionConfig, SamplingConfig, check_sampling, nfe
from components.diffusion.precond import Preconditioner, build_denoiser
from components.diffusion.samplers import sample
from components.generators import TOKENIZER_DIR, merge_options, read_generator, sample_labels, save_generator

FAMILY = "diffusion"


def export(
    path: str | Path,
    *,
    denoiser_state: Mapping[str, torch.Tensor],
    model: DiffusionConfig,
    sampling: SamplingConfig,
    image_shape: Sequence[int],
    num_classes: int,
    latent: Mapping[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> None:
    """Write a diffusion generator folder; `latent` = {"mean", "std", "shape"} needs `tokenizer_dir`."""
    check_sampling(model, sampling)
    if num_classes != model.backbone.num_classes:
        raise ValueError(
            f"num_classes={num_classes} must equal model.backbone.num_classes={model.backbone.num_classes}"
        )
    if (latent is None) != (tokenizer_dir is None):
        raise ValueError(
            "a latent model needs both latent={mean, std, shape} and tokenizer_dir; a pixel model neither"
        )
    if latent is not None:
        latent = _check_latent(latent, channels=model.backbone.in_channels)
    config = {
        "model": model.model_dump(mode="json"),
        "sampling": sampling.model_dump(mode="json"),
        "image_shape": [int(s) for s in image_shape],
        "num_classes": int(num_classes),
        "latent": latent,
    }
    save_generator(
        path, family=FAMILY, state=dict(denoiser_state), config=config, tokenizer_dir=tokenizer_dir
    )


def _check_latent(latent: Mapping[str, Any], *, channels: int) -> dict[str, list]:
    missing = {"mean", "std", "shape"} - set(latent)
    if missing:
        raise ValueError(f"latent lacks keys {sorted(missing)}; needs mean, std, shape")
    shape = [int(s) for s in latent["shape"]]
    if len(shape) != 3 or shape[0] != channels:
        raise ValueError(f"latent shape {shape} must be [D={channels}, h, w]")
    out = {"shape": shape}
    for key in ("mean", "std"):
        values = torch.as_tensor(latent[key], dtype=torch.float32).reshape(-1)
        if values.numel() not in (1, channels):
            raise ValueError(f"latent {key} must hold 1 or {channels} values, got {values.numel()}")
        out[key] = values.expand(channels).tolist()
    return out


class DiffusionGenerator:
    """A loaded diffusion model: `sample(labels, generator=..., **options)` -> images in [-1, 1]."""

    def __init__(
        self,
        denoiser: Preconditioner,
        *,
        model: DiffusionConfig,
        sampling: SamplingConfig,
        image_shape: tuple[int, int, int],
        num_classes: int,
        latent: Mapping[str, Any] | None = None,
        decoder: torch.nn.Module | None = None,
    ) -> None:
        self.denoiser, self.model, self.sampling = denoiser, model, sampling
        self.image_shape, self.num_classes = image_shape, num_classes
        self.latent, self.decoder = latent, decoder
        self.default_options: dict[str, Any] = sampling.model_dump()

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def options(self, **options: Any) -> SamplingConfig:
        """The SamplingConfig for these options over the trained defaults; one-line errors."""
        merged = merge_options(FAMILY, self.default_options, options)
        try:
            sampling = SamplingConfig.model_validate(merged)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "options"
            msg = first["msg"].removeprefix("Value error, ")
            raise ValueError(f"{FAMILY}: {key}={first.get('input')!r}: {msg}") from None
        check_sampling(self.model, sampling)
        return sampling

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options over the trained defaults, validated as `options` does."""
        return self.options(**options).model_dump()

    def nfe(self, **options: Any) -> int:
        """Network evaluations per sample for these options (see `config.nfe`)."""
        return nfe(self.options(**options))

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor | int, *, generator: torch.Generator, **options: Any
    ) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1]; an int asks for n unconditional samples (the empty class)."""
        sampling = self.options(**options)
        n, labels = sample_labels(labels, num_classes=self.num_classes)
        device = self.device
        if labels is None and self.num_classes:
            labels = torch.full((n,), self.num_classes, dtype=torch.long)  # unconditional: empty class
            sampling = sampling.model_copy(update={"guidance": 1.0})  # nothing to guide towards
        labels = labels.to(device) if labels is not None else None
        shape = tuple(self.latent["shape"]) if self.latent is not None else self.image_shape
        x = sample(
            self.denoiser,
            (n, *shape),
            model=self.model,
            sampling=sampling,
            labels=labels,
            generator=generator,
            device=device,
        )
        if self.latent is not None:
            mean = torch.tensor(self.latent["mean"], device=device).reshape(1, -1, 1, 1)
            std = torch.tensor(self.latent["std"], device=device).reshape(1, -1, 1, 1)
            x = self.decoder.decode_latents(x * std + mean)
        return x.clamp(-1, 1)


def load(model_dir: str | Path, *, device: torch.device | str = "cpu") -> DiffusionGenerator:
    """Rebuild the generator exported by `export`, in eval mode on `device`."""
    model_dir = Path(model_dir)
    state, config = read_generator(model_dir)
    missing = {"model", "sampling", "image_shape", "num_classes"} - set(config)
    if missing:
        raise ValueError(f"{model_dir / 'config.json'} lacks keys {sorted(missing)}: not a diffusion export")
    model = DiffusionConfig.model_validate(config["model"])
    sampling = SamplingConfig.model_validate(config["sampling"])
    denoiser = build_denoiser(model)
    denoiser.load_state_dict(state)
    denoiser.to(device).eval()
    decoder = None
    if config.get("latent") is not None:
        from components.tokenizer.export import load_vqgan

        decoder = load_vqgan(model_dir / TOKENIZER_DIR, device=device)
    return DiffusionGenerator(
        denoiser,
        model=model,
        sampling=sampling,
        image_shape=tuple(config["image_shape"]),
        num_classes=int(config["num_classes"]),
        latent=config.get("latent"),
        decoder=decoder,
    )
