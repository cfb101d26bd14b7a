"""Training a token prior as a task of the training loop (Esser et al. 2021 sec. 3.2; Chang et al. 2022).

One phase "main", AdamW with the loop's lr, betas and weight decay (decay on Linear weights only:
no decay on norms, biases and embeddings, as in nanoGPT). GPT: next-token cross-entropy over the
whole grid. MaskGIT: cross-entropy on the positions masked by the schedule. Labels are replaced by
the null class with probability `label_dropout` so that one model serves classifier-free guidance
(Ho & Salimans 2022, sec. 3.2); an unlabelled sample (label -1) always gets the null class.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from components.prior.config import PriorConfig
from components.prior.gpt import GPT
from components.prior.maskgit import MaskGIT, masked_loss, random_mask
from components.training.config import LoopConfig
from components.training.task import Batch, Phase, Task, Wrap

PRIORS: dict[str, type[nn.Module]] = {"gpt": GPT, "maskgit": MaskGIT}


def build_prior(
    config: PriorConfig, *, grid: tuple[int, int], codebook_size: int, num_classes: int
) -> GPT | MaskGIT:
    """The prior `config.kind` names, for token grids of shape `grid` with `codebook_size` codes."""
    if config.kind not in PRIORS:
        raise ValueError(f"unknown prior kind {config.kind!r}; valid: {', '.join(PRIORS)}")
    check_sizes(grid=grid, codebook_size=codebook_size, num_classes=num_classes)
    return PRIORS[config.kind](
        config.model, num_tokens=grid[0] * grid[1], codebook_size=codebook_size, num_classes=num_classes
    )


def check_sizes(*, grid: tuple[int, int], codebook_size: int, num_classes: int) -> None:
    """One-line error unless grid is (h, w) with h, w >= 1, codebook_size >= 2 and num_classes >= 0."""
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid={tuple(grid)} must be (h, w) with h, w >= 1")
    if codebook_size < 2:
        raise ValueError(f"codebook_size={codebook_size} must be >= 2")
    if num_classes < 0:
        raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")


def param_groups(module: nn.Module, *, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on Linear weights; none on norms, biases, embeddings, positions."""
    decay = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    params = list(module.parameters())
    return [
        {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]


class PriorTask(Task):
    """Trains a GPT or MaskGIT prior on batches of "tokens" (B, h, w) and "label" (B,)."""

    phases = (Phase("main", "main"),)
    ema_module = "prior"  # used when loop.ema_decay is set

    def __init__(
        self,
        prior: PriorConfig,
        loop: LoopConfig,
        *,
        grid: tuple[int, int],
        codebook_size: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.cfg, self.loop = prior, loop
        self.grid, self.codebook_size, self.num_classes = tuple(grid), codebook_size, num_classes
        check_sizes(grid=self.grid, codebook_size=codebook_size, num_classes=num_classes)  # fail fast
        self.device = torch.device("cpu")

    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        self.device = torch.device(device)
        prior = build_prior(
            self.cfg, grid=self.grid, codebook_size=self.codebook_size, num_classes=self.num_classes
        )
        self.modules = {"prior": prior.to(self.device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        groups = param_groups(self.modules["prior"], weight_decay=self.loop.weight_decay)
        return {"main": torch.optim.AdamW(groups, lr=self.loop.lr, betas=self.loop.betas)}

    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if phase != "main":
            raise ValueError(f"unknown phase {phase!r}; valid: ['main']")
        tokens = self._tokens(batch)
        classes = self._classes(batch["label"], drop=self.cfg.label_dropout)
        loss, accuracy, _ = self._loss(self.wrapped["prior"], tokens, classes)
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}

    def _loss(
        self, model: nn.Module, tokens: torch.Tensor, classes: torch.Tensor, *, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(Mean cross-entropy in nats/token, accuracy, number of targets) of tokens (B, N)."""
        if self.cfg.kind == "gpt":
            logits = model(tokens, classes)  # (B, N, K)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
            return loss, (logits.argmax(dim=-1) == tokens).float().mean(), tokens.numel()
        mask = random_mask(tokens, schedule=self.cfg.maskgit.mask_schedule, generator=generator)
        logits = model(tokens.masked_fill(mask, self.codebook_size), classes)
        return *masked_loss(logits, tokens, mask), int(mask.sum())

    def _tokens(self, batch: Batch) -> torch.Tensor:
        """Batch "tokens" (B, h, w) -> (B, N), checked against the grid and the codebook."""
        tokens = batch["tokens"]
        if tuple(tokens.shape[1:]) != self.grid:
            raise ValueError(
                f"tokens have grid {tuple(tokens.shape[1:])}, the prior was built for {self.grid}"
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(
                f"tokens must lie in [0, {self.codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        return tokens.long().flatten(1)

    def _classes(self, labels: torch.Tensor, *, drop: float) -> torch.Tensor:
        """Class ids (B,): the label, or the null class (num_classes) if unlabelled, dropped or unconditional."""
        labels = labels.long()
        null = torch.full_like(labels, self.num_classes)
        if self.num_classes == 0:
            return null
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) or be -1 (unlabelled), "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        dropped = labels < 0
        if drop > 0:
            dropped = dropped | (torch.rand(labels.shape, device=labels.device) < drop)
        return torch.where(dropped, null, labels)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation cross-entropy (nats/token) and accuracy; MaskGIT's masks from a fixed seed."""
        model = self.modules["prior"]
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=self.device).manual_seed(0)  # the same masks every time
        loss_sum, acc_sum, count = 0.0, 0.0, 0
        for batch in batches:
            tokens = self._tokens(batch).to(self.device)
            classes = self._classes(batch["label"].to(self.device), drop=0.0)
            loss, accuracy, targets = self._loss(model, tokens, classes, generator=generator)
            # per target token: MaskGIT's batches hold different numbers of masked positions
            loss_sum += float(loss) * targets
            acc_sum += float(accuracy) * targets
            count += targets
        model.train(was_training)
        if count == 0:
            raise ValueError("evaluate got no validation samples")
        return {"loss": loss_sum / count, "accuracy": acc_sum / count}

    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor | None:
        """No images without a tokenizer: the exported generator decodes samples (generator.py)."""
        return None
