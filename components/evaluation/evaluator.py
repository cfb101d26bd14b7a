"""The evaluator: a small CNN classifier whose penultimate features serve the image metrics.

It plays the role Inception-v3 plays for FID (Heusel et al. 2017): trained on the prepared data
itself, its `features` feed the Fréchet distance and precision/recall, its `feature_maps` a
perceptual loss (LPIPS-style, Zhang et al. 2018), and its logits the conditional accuracy.
Training augments with random translations only: digits are not flip-invariant.

A classifier learns to name a class whatever its colours, so where colour does not tell classes
apart (glyphs in random colours) its features, and every distance on them, go colour-blind: grey
copies of the real glyphs scored FD / floor 1.15 (issue #21). So `features` end with the image's
colour layout: its `thumbnail` x `thumbnail` average-pooled copy, pixel values in [-1, 1] (per
dimension about as spread as the learned features, 0.35 against 0.44 on glyphs). Grey copies then
score ~19x the floor. A learned way failed: a loss asking the features to reconstruct the thumbnail
stalled classification at chance on glyphs, even at 0.1 x the mean colour. Feeding the thumbnail
into the projection only was not kept: nothing there stops the classification loss, to which colour
is noise, from weighting it down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components.io import load_model, save_model
from components.schema import StrictConfig
from components.training.config import LoopConfig
from components.training.task import Batch, Phase, Task, Wrap

MIN_SIZE = 8  # two 2x downsamplings must leave a spatial grid to pool


class EvaluatorConfig(StrictConfig):
    """Architecture and regularisation of the evaluator classifier."""

    widths: tuple[int, ...] = Field(default=(32, 64, 128), min_length=1)  # channels per stage
    feature_dim: int = Field(default=128, gt=0)  # penultimate features (FD, precision/recall)
    norm_groups: int = Field(default=8, gt=0)  # GroupNorm: per-sample, so train and eval agree
    dropout: float = Field(default=0.1, ge=0, lt=1)  # before the classifier head
    # Random translation up to N pixels (0: none); 2 did worse than 1 on 16x16 digits.
    augment_shift: int = Field(default=1, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    # The colour layout appended to the features: the image average-pooled to this side (C x side^2
    # values); 0: none (the learned features alone, colour-blind where colour is noise to the classes).
    thumbnail: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _widths_fit_groups(self) -> EvaluatorConfig:
        bad = [w for w in self.widths if w <= 0 or w % self.norm_groups]
        if bad:
            raise ValueError(
                f"widths {list(bad)} must be positive multiples of norm_groups={self.norm_groups}"
            )
        return self


def _conv_block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
    )


class Evaluator(nn.Module):
    """Stages of two 3x3 conv blocks (a 2x average pool enters stages 2 and 3), global pool, MLP head."""

    def __init__(self, cfg: EvaluatorConfig, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(f"in_channels={in_channels} must be >= 1 and num_classes={num_classes} >= 2")
        self.cfg = cfg
        self.in_channels = in_channels
        self.num_classes = num_classes
        stages, c = [], in_channels
        for i, w in enumerate(cfg.widths):
            pool = [nn.AvgPool2d(2)] if 0 < i < 3 else []  # at most two downsamplings: 8x8 -> 2x2
            stages.append(
                nn.Sequential(*pool, _conv_block(c, w, cfg.norm_groups), _conv_block(w, w, cfg.norm_groups))
            )
            c = w
        self.stages = nn.ModuleList(stages)
        self.project = nn.Sequential(nn.Linear(c, cfg.feature_dim), nn.SiLU())
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, num_classes))

    @classmethod
    def from_config(cls, cfg: EvaluatorConfig, *, in_channels: int, num_classes: int) -> Evaluator:
        return cls(cfg, in_channels=in_channels, num_classes=num_classes)

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the module (config.json)."""
        return {
            "model": self.cfg.model_dump(mode="json"),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluator:
        missing = {"model", "in_channels", "num_classes"} - set(d)
        if missing:
            raise ValueError(f"evaluator config lacks keys {sorted(missing)}")
        # an evaluator saved before `thumbnail` existed had none
        cfg = EvaluatorConfig.model_validate({"thumbnail": 0, **d["model"]})
        return cls(cfg, in_channels=int(d["in_channels"]), num_classes=int(d["num_classes"]))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < MIN_SIZE:
            raise ValueError(
                f"evaluator expects (B, {self.in_channels}, H, W) with H, W >= {MIN_SIZE}, got {tuple(x.shape)}"
            )

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after each stage, (B, widths[i], H_i, W_i), for a perceptual loss."""
        self._check(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    @property
    def feature_dim(self) -> int:
        """Width of `features`: the learned ones, then the thumbnail's."""
        return self.cfg.feature_dim + self.in_channels * self.cfg.thumbnail**2

    def _learned(self, x: torch.Tensor) -> torch.Tensor:
        h = self.feature_maps(x)[-1].mean(dim=(2, 3))  # global average pool: any size >= 8
        return self.project(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, feature_dim) of images in [-1, 1]: the penultimate layer's, then the
        thumbnail (the colour layout: the classifier's own features are blind to colour it does not need)."""
        h = self._learned(x)
        if not self.cfg.thumbnail:
            return h
        return torch.cat([h, F.adaptive_avg_pool2d(x, self.cfg.thumbnail).flatten(1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes), from the learned features."""
        return self.head(self._learned(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from `features` (B, feature_dim): the same as forward on their images."""
        return self.head(features[:, : self.cfg.feature_dim])


def random_shift(x: torch.Tensor, *, max_shift: int) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]^2 (replicate-pad, crop)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1), device=x.device)  # global RNG: the loop checkpoints it
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    idx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"evaluator needs labels in 0..{num_classes - 1}, got range {int(y.min())}..{int(y.max())} "
            "(unlabelled data is -1)"
        )


class EvaluatorTask(Task):
    """Cross-entropy training of the evaluator: one phase, AdamW, translation augmentation."""

    phases = (Phase("main", "main"),)

    def __init__(
        self, model: EvaluatorConfig, loop: LoopConfig, *, in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.cfg = model
        self.loop = loop
        self.in_channels = in_channels
        self.num_classes = num_classes

    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        net = Evaluator.from_config(self.cfg, in_channels=self.in_channels, num_classes=self.num_classes)
        self.modules = {"evaluator": net.to(device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = list(self.modules["evaluator"].parameters())
        groups = [  # no weight decay on norms and biases (the usual AdamW practice)
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.loop.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return {"main": torch.optim.AdamW(groups, lr=self.loop.lr, betas=self.loop.betas)}

    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if phase != "main":
            raise ValueError(f"unknown phase {phase!r}; valid: ['main']")
        y = batch["label"]
        _check_labels(y, self.num_classes)
        x = random_shift(batch["image"], max_shift=self.cfg.augment_shift)
        logits = self.wrapped["evaluator"](x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Plain cross-entropy (no smoothing) and accuracy over all batches (the loop logs val/<key>)."""
        net = self.modules["evaluator"]
        was_training = net.training
        net.eval()
        loss_sum, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for batch in batches:
                y = batch["label"]
                _check_labels(y, self.num_classes)
                logits = net(batch["image"])
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                count += y.numel()
        net.train(was_training)
        if count == 0:
            raise ValueError("evaluate got no validation samples")
        return {"accuracy": correct / count, "loss": loss_sum / count}


@torch.no_grad()
def predict(evaluator: Evaluator, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted class (N,) int64 of images (N, C, H, W) in [-1, 1], in eval mode, batch by batch."""
    was_training = evaluator.training
    evaluator.eval()
    device = next(evaluator.parameters()).device
    out = [evaluator(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(batch_size)]
    evaluator.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def cond_accuracy(
    evaluator: Evaluator, images: torch.Tensor, requested_labels: torch.Tensor, *, batch_size: int = 256
) -> float:
    """Share of generated images the evaluator classifies as the label they were generated for."""
    if images.shape[0] != requested_labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"images ({images.shape[0]}) and requested_labels ({requested_labels.shape[0]}) must be equal, nonzero"
        )
    pred = predict(evaluator, images, batch_size=batch_size)
    return float((pred == requested_labels.cpu().long()).float().mean())


def save_evaluator(evaluator: Evaluator, directory: str | Path) -> None:
    """Write model.safetensors and config.json into `directory`, atomically."""
    save_model(directory, evaluator.state_dict(), evaluator.to_dict())


def load_evaluator(
    directory: str | Path | Mapping[str, bytes], *, device: str | torch.device = "cpu"
) -> Evaluator:
    """Rebuild an evaluator from `directory` (config.json + model.safetensors, or their bytes), in eval mode."""
    state, config = load_model(directory)
    evaluator = Evaluator.from_dict(config)
    evaluator.load_state_dict(state)
    return evaluator.to(device).eval()
