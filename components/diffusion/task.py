"""Diffusion training as a task of the training loop (Karras et al. 2022, eq. 8; Ho & Salimans 2022 CFG).

One phase, "main": draw sigma from the objective's p(sigma) and n ~ N(0, I) from the global RNG (the
loop seeds and checkpoints it), drop labels to the empty class at `label_dropout`, and minimise the
batch mean of `denoising_loss`. Pixel input is "image" in [-1, 1]; latent input is "latent"
standardised per channel with the given mean and std (Rombach et al. 2022 scale their latents too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from components.diffusion.config import DiffusionConfig, SamplingConfig, check_sampling
from components.diffusion.loss import denoising_loss, drop_labels
from components.diffusion.noise import sample_sigma
from components.diffusion.precond import build_denoiser
from components.diffusion.samplers import sample
from components.training.config import LoopConfig
from components.training.task import Batch, Phase, Task, Wrap

INPUT_KEYS = ("image", "latent")
PREVIEW_STEPS = 8  # progress grids only need a rough picture
EVAL_SEED = 1234  # validation sigma and noise: the same draws at every evaluation


def _per_channel(value: float | Sequence[float] | torch.Tensor, *, name: str, channels: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, channels):
        raise ValueError(f"{name} must be a float or {channels} per-channel values, got {t.numel()}")
    return t.expand(channels).reshape(1, channels, 1, 1).clone()


class DiffusionTask(Task):
    """Trains `denoiser` = preconditioner(UNet) with AdamW; EMA on the denoiser."""

    phases = (Phase("main", "main"),)
    ema_module = "denoiser"

    def __init__(
        self,
        model: DiffusionConfig,
        loop: LoopConfig,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        input_key: str = "image",
        num_classes: int = 0,
        latent_mean: float | Sequence[float] | torch.Tensor = 0.0,
        latent_std: float | Sequence[float] | torch.Tensor = 1.0,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if input_key not in INPUT_KEYS:
            raise ValueError(f"input_key={input_key!r} is not valid; choose one of: {', '.join(INPUT_KEYS)}")
        if num_classes != model.backbone.num_classes:
            raise ValueError(
                f"num_classes={num_classes} must equal model.backbone.num_classes={model.backbone.num_classes}"
            )
        check_sampling(model, sampling)
        channels = model.backbone.in_channels
        self.cfg, self.loop, self.sampling = model, loop, sampling
        self.input_key, self.num_classes = input_key, num_classes
        self.latent_mean = _per_channel(latent_mean, name="latent_mean", channels=channels)
        self.latent_std = _per_channel(latent_std, name="latent_std", channels=channels)
        if (self.latent_std <= 0).any():
            raise ValueError(f"latent_std must be positive, got {self.latent_std.flatten().tolist()}")
        self.image_shape = image_shape  # (C, H, W) of the samples `sample` draws; None: from the data
        self.device = torch.device("cpu")

    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        self.device = torch.device(device)
        self.modules = {"denoiser": build_denoiser(self.cfg).to(self.device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}
        self.latent_mean = self.latent_mean.to(self.device)
        self.latent_std = self.latent_std.to(self.device)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = list(self.modules["denoiser"].parameters())
        groups = [  # no weight decay on norms and biases (the usual AdamW practice)
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.loop.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return {"main": torch.optim.AdamW(groups, lr=self.loop.lr, betas=self.loop.betas)}

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x0 (B, C, H, W) in the space the model learns, and labels (B,) or None."""
        if self.input_key not in batch:
            raise ValueError(f"batch lacks {self.input_key!r} (input_key); it has {sorted(batch)}")
        x0 = batch[self.input_key].float()
        if self.image_shape is None:
            self.image_shape = tuple(x0.shape[1:])
        if self.input_key == "latent":
            x0 = (x0 - self.latent_mean) / self.latent_std
        if self.num_classes == 0:
            return x0, None
        return x0, batch["label"].long()

    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if phase != "main":
            raise ValueError(f"unknown phase {phase!r}; valid: ['main']")
        x0, labels = self._inputs(batch)
        if labels is not None:
            labels = drop_labels(labels, rate=self.cfg.label_dropout, num_classes=self.num_classes)
        sigma = sample_sigma(x0.shape[0], config=self.cfg, device=x0.device)
        noise = torch.randn_like(x0)
        per_sample, diag = denoising_loss(self.wrapped["denoiser"], x0, sigma, noise, labels, config=self.cfg)
        loss = per_sample.mean()
        return loss, {"loss": loss.detach(), **diag}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation denoising loss with seeded sigma and noise (comparable across evaluations)."""
        denoiser = self.modules["denoiser"]
        generator = torch.Generator(device=self.device).manual_seed(EVAL_SEED)
        total, count = 0.0, 0
        for batch in batches:
            x0, labels = self._inputs({k: v.to(self.device) for k, v in batch.items()})
            if labels is not None:  # conditional loss; unlabelled samples (-1) use the empty class
                labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
            sigma = sample_sigma(x0.shape[0], config=self.cfg, generator=generator, device=self.device)
            noise = torch.randn(x0.shape, generator=generator, device=self.device)
            per_sample, _ = denoising_loss(denoiser, x0, sigma, noise, labels, config=self.cfg)
            total += float(per_sample.sum())
            count += x0.shape[0]
        if count == 0:
            raise ValueError("evaluate got no validation samples")
        return {"loss": total / count}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor | None:
        """n pixel samples in [-1, 1] with the trained sampler on PREVIEW_STEPS steps; None for latents."""
        if self.input_key == "latent" or self.image_shape is None:
            return None
        labels = None
        if self.num_classes:
            labels = torch.arange(n, device=self.device) % self.num_classes
        sampling = self.sampling.model_copy(update={"steps": min(self.sampling.steps, PREVIEW_STEPS)})
        x = sample(
            self.modules["denoiser"],
            (n, *self.image_shape),
            model=self.cfg,
            sampling=sampling,
            labels=labels,
            generator=generator,
            device=self.device,
        )
        return x.clamp(-1, 1)
