"""VQGAN training as a task of the training loop (Esser et al. 2021, sec. 3.1, eq. 5-7).

Two phases: "generator" updates encoder, quantizer and decoder on
    L = L_rec + codebook_weight * L_q + lambda * L_G   (lambda * L_G from disc.start_step on),
and "discriminator" updates the PatchGAN from disc.start_step on. Adam with the loop's betas
(taming-transformers uses (0.5, 0.9)). The generator's adversarial term runs the discriminator with
detached parameters (torch.func.functional_call), so the generator phase leaves no gradients in the
discriminator and never touches its DDP reducer; the discriminator phase reconstructs under no_grad,
which also keeps its forward from moving the VQ codebook.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.func import functional_call

from components.nn.discriminator import PatchDiscriminator
from components.tokenizer.base import CodeUsage
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.gumbel import GumbelQuantizer, gumbel_tau
from components.tokenizer.loss import (
    FeatureFn,
    PerceptualLoss,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)
from components.tokenizer.vqgan import VQGAN
from components.training.config import LoopConfig
from components.training.task import Batch, Phase, Task, Wrap


class TokenizerTask(Task):
    """Trains a VQGAN; `feature_fn` (e.g. the evaluator's `feature_maps`) drives the perceptual loss."""

    def __init__(
        self, model: TokenizerConfig, loop: LoopConfig, *, feature_fn: FeatureFn | None = None
    ) -> None:
        super().__init__()
        loss = model.loss
        if loss.perceptual_weight > 0 and feature_fn is None:
            raise ValueError(
                f"loss.perceptual_weight={loss.perceptual_weight} needs a feature network (feature_fn); "
                "pass one or set loss.perceptual_weight: 0"
            )
        self.cfg, self.loop = model, loop
        self.perceptual = PerceptualLoss(feature_fn) if feature_fn and loss.perceptual_weight > 0 else None
        self.use_disc = loss.disc.weight > 0
        phases = [Phase("generator", "generator")]
        if self.use_disc:
            phases.append(Phase("discriminator", "discriminator", start_step=loss.disc.start_step))
        self.phases = tuple(phases)
        self.device = torch.device("cpu")

    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        self.device = torch.device(device)
        self.modules = {"vqgan": VQGAN(self.cfg).to(self.device)}
        if self.use_disc:
            disc = self.cfg.loss.disc
            self.modules["discriminator"] = PatchDiscriminator(
                in_channels=self.cfg.autoencoder.in_channels,
                channels=disc.channels,
                n_layers=disc.layers,
                norm=disc.norm,
            ).to(self.device)
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}
        if self.perceptual is not None:
            self.perceptual.to(self.device)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        lr, betas = self.loop.lr, self.loop.betas
        opts = {"generator": torch.optim.Adam(self.modules["vqgan"].parameters(), lr=lr, betas=betas)}
        if self.use_disc:
            d_lr = lr * self.cfg.loss.disc.lr_ratio
            opts["discriminator"] = torch.optim.Adam(
                self.modules["discriminator"].parameters(), lr=d_lr, betas=betas
            )
        return opts

    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._set_tau(step)
        if phase == "generator":
            return self._generator_step(batch["image"], step=step)
        if phase == "discriminator" and self.use_disc:
            return self._discriminator_step(batch["image"])
        raise ValueError(f"unknown phase {phase!r}; valid: {[p.name for p in self.phases]}")

    def _set_tau(self, step: int) -> None:
        quantizer = self.modules["vqgan"].quantizer
        if isinstance(quantizer, GumbelQuantizer):
            q = self.cfg.quantizer
            quantizer.tau = gumbel_tau(
                step, tau_start=q.tau_start, tau_end=q.tau_end, anneal_steps=q.anneal_steps
            )

    def _generator_step(self, x: torch.Tensor, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_cfg = self.cfg.loss
        x_rec, qloss, _, diag = self.wrapped["vqgan"](x)
        rec = reconstruction_loss(x, x_rec, kind=loss_cfg.recon).mean()
        nll = loss_cfg.recon_weight * rec
        out = {"rec_loss": rec.detach(), "q_loss": qloss.detach(), **diag}
        if self.perceptual is not None:
            p_loss = self.perceptual(x, x_rec).mean()
            nll = nll + loss_cfg.perceptual_weight * p_loss
            out["p_loss"] = p_loss.detach()
        loss = nll + loss_cfg.codebook_weight * qloss
        if self.use_disc and step >= loss_cfg.disc.start_step:
            g_loss = generator_loss(self._frozen_disc(x_rec), kind=loss_cfg.disc.loss)
            lam = self._adversarial_weight(nll, g_loss)
            loss = loss + lam * g_loss
            out |= {"g_loss": g_loss.detach(), "d_weight": lam.detach()}
        out["loss"] = loss.detach()
        return loss, out

    def _frozen_disc(self, x: torch.Tensor) -> torch.Tensor:
        """Discriminator logits with gradients to the input only (raw module, detached weights)."""
        disc = self.modules["discriminator"]
        params = {k: v.detach() for k, v in disc.named_parameters()}
        return functional_call(disc, params, (x,))

    def _adversarial_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        loss_cfg = self.cfg.loss
        if not loss_cfg.adaptive_weight:
            return g_loss.new_tensor(loss_cfg.disc.weight)
        last_layer = self.modules["vqgan"].decoder.last_layer  # the raw module's Parameter (DDP shares it)
        return adaptive_weight(
            nll, g_loss, last_layer, weight=loss_cfg.disc.weight, max_weight=loss_cfg.adaptive_max
        )

    def _discriminator_step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            x_rec = self.modules["vqgan"](x)[0]
        # real and fake in one forward: GroupNorm is per sample, and DDP sees a single forward
        logits = self.wrapped["discriminator"](torch.cat([x, x_rec]))
        real, fake = logits.chunk(2)
        loss = discriminator_loss(real, fake, kind=self.cfg.loss.disc.loss)
        real, fake = real.detach(), fake.detach()
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": real.mean(),
            "logits_fake": fake.mean(),
            # share of patch logits on the right side of 0; 0.5 is chance (a blind discriminator)
            "d_acc_real": (real > 0).float().mean(),
            "d_acc_fake": (fake < 0).float().mean(),
        }

    def after_update(self, phase: str, *, step: int) -> None:
        """After each generator step: EMA codebook and dead-code restarts (every rank, in lockstep)."""
        if phase == "generator":
            self.modules["vqgan"].quantizer.update()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> reconstruction in [-1, 1], in eval mode (hard codes)."""
        vqgan = self.modules["vqgan"]
        was_training = vqgan.training
        vqgan.eval()
        x_rec = vqgan(x.to(self.device))[0].clamp(-1.0, 1.0)
        vqgan.train(was_training)
        return x_rec

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """l1, psnr (dB, images on [0, 1]), codebook_usage and perplexity over all batches.

        Under DDP this is a collective (the code histogram is summed over ranks), so every rank calls
        it, as the training loop does; l1 and psnr are this rank's means, which the loop averages.
        """
        usage = CodeUsage(self.modules["vqgan"].codebook_size)
        vqgan = self.modules["vqgan"]
        was_training = vqgan.training
        vqgan.eval()
        l1_sum, psnr_sum, count = 0.0, 0.0, 0
        for batch in batches:
            x = batch["image"].to(self.device)
            x_rec, _, indices, _ = vqgan(x)
            x_rec = x_rec.clamp(-1.0, 1.0)
            l1_sum += float((x - x_rec).abs().flatten(1).mean(1).sum())
            mse = ((x - x_rec) / 2).pow(2).flatten(1).mean(1)  # [-1, 1] -> [0, 1] scale
            psnr_sum += float((-10 * torch.log10(mse.clamp_min(1e-10))).sum())
            count += x.shape[0]
            usage.update(indices)
        vqgan.train(was_training)
        if count == 0:
            raise ValueError("evaluate got no validation samples")
        usage.all_reduce()  # usage of the whole validation set: the loop calls evaluate on every rank
        return {
            "l1": l1_sum / count,
            "psnr": psnr_sum / count,
            "codebook_usage": usage.usage(),
            "perplexity": usage.perplexity(),
        }

    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor | None:
        """A tokenizer cannot sample; see `reconstruct`."""
        return None
