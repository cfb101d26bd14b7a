"""DCGAN and WGAN-GP, class-conditional with a projection discriminator.

DCGAN (Radford et al. 2016): a fractionally-strided conv generator with BatchNorm and ReLU, a strided
conv discriminator with LeakyReLU(0.2), weights N(0, 0.02). Loss "ns": the non-saturating game of
Goodfellow et al. 2014 (sec. 3), with D(x) = sigmoid(logit):
    L_D = softplus(-l(x)) + softplus(l(G(z))),   L_G = softplus(-l(G(z))).
Loss "wgan_gp" (Gulrajani et al. 2017, Algorithm 1, eq. 3): critic loss
    L_C = C(G(z)) - C(x) + lambda (||grad_x_hat C(x_hat)||_2 - 1)^2,  x_hat = eps x + (1 - eps) G(z),
lambda = 10, n_critic = 5 critic updates (`Phase.repeats`) per generator update L_G = -C(G(z)),
Adam(lr 1e-4, betas (0, 0.9)); C(x) - C(G(z)) is logged as the Wasserstein estimate. The Adam
betas come from GANConfig.betas (null: (0.5, 0.999) of DCGAN or (0, 0.9) of WGAN-GP), not loop.betas.

Conditioning: the projection discriminator (Miyato & Koyama 2018, eq. 3),
    l(x, y) = psi(phi(x)) + <embed(y), sum_hw phi(x)>,
and, in the generator, a class embedding concatenated with z (cGAN, Mirza & Osindero 2014) plus
conditional BatchNorm (per-class gain and bias, as in the projection paper). A real
image labelled -1 gets no projection term (the unconditional part judges it); its fake partner
draws a class uniformly. The discriminator's normalization is per sample, LayerNorm over (C, H, W)
(GroupNorm with one group) or none, never BatchNorm: the gradient penalty is per sample (BatchNorm
couples the samples in a batch, which "invalidates" the penalty, Gulrajani et al. sec. 4), real and
fake share one forward (one DDP forward per backward), and train and eval modes agree.

Diversity. Nothing in L_G rewards two fakes of one class for differing, and the projection term
gives every fake of class y the same push towards that class's best-scoring image: in a short, fast
run the generator learns to ignore z (one image per class). Options, all off by default:
`mode_seeking` lambda adds lambda / (mean|G(z1, y) - G(z2, y)| / mean|z1 - z2|) to L_G over pairs
that share a class (Mao et al. 2019, eq. 3): the direct remedy for a conditional generator that
ignores z; `d_mbstd_group` appends the minibatch standard deviation to D's last features (Karras et
al. 2018, sec. 3; groups never mix real and fake); `d_spectral_norm` (Miyato et al. 2018);
`r1_weight` gamma adds gamma / 2 ||grad_x D(x)||^2 on reals to L_D (Mescheder et al. 2018, eq. 9).

Small data. Over many epochs D memorises the training images and its gradient stops guiding G;
`d_augment` (DiffAugment, Zhao et al. 2020) passes every image D sees, real or fake, in either phase,
through the same random differentiable transforms (gan_layers.diff_augment). R1 and the gradient
penalty differentiate through them, with respect to the un-augmented images.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

from components.nn.blocks import group_norm
from components.schema import StrictConfig
from components.training.config import LoopConfig
from components.training.task import Batch, Phase, Task, Wrap
from components.zoo import adversarial
from components.zoo.common import ZooGenerator, export_zoo, load_zoo, progress_labels
from components.zoo.gan_layers import AUGMENTS, CondBatchNorm, diff_augment, minibatch_std

MIN_START = 4  # the generator starts from a map of at least 4x4, as DCGAN does


class GANConfig(StrictConfig):
    """Networks, loss and optimizer defaults; null fields take the chosen loss's paper values."""

    loss: Literal["ns", "wgan_gp"] = "ns"
    latent_dim: int = Field(default=100, ge=1)  # DCGAN's z
    g_channels: int = Field(default=64, ge=4, description="generator width at the output resolution")
    d_channels: int = Field(default=64, ge=4, description="discriminator width at the input resolution")
    d_norm: Literal["layer", "none"] = "layer"
    n_critic: int | None = Field(default=None, ge=1, description="discriminator updates per generator one")
    gp_weight: float = Field(default=10.0, ge=0, description="lambda of the gradient penalty (wgan_gp)")
    betas: tuple[float, float] | None = Field(default=None, description="Adam betas; replaces loop.betas")
    d_lr_ratio: float = Field(default=1.0, gt=0, description="discriminator lr / generator lr")
    d_spectral_norm: bool = Field(default=False, description="spectral norm on D's weights (Miyato 2018)")
    d_mbstd_group: int = Field(default=0, ge=0, description="minibatch-std group size (Karras 2018); 0: off")
    r1_weight: float = Field(default=0.0, ge=0, description="gamma of R1 on reals (Mescheder 2018); 0: off")
    mode_seeking: float = Field(
        default=0.0, ge=0, description="lambda of the mode-seeking term (Mao 2019); 0: off"
    )
    d_augment: list[Literal[AUGMENTS]] = Field(
        default_factory=list, description="DiffAugment's transforms on D's every input (Zhao 2020); []: off"
    )

    @model_validator(mode="after")
    def _r1_is_read(self) -> GANConfig:
        if self.loss == "wgan_gp" and self.r1_weight > 0:
            raise ValueError(
                "r1_weight is not read by wgan_gp: its gradient penalty (gp_weight) regularises the critic"
            )
        return self

    @property
    def family(self) -> str:
        """The generator family an export is filed under."""
        return "wgan" if self.loss == "wgan_gp" else "gan"

    @property
    def critic_repeats(self) -> int:
        return self.n_critic if self.n_critic is not None else (5 if self.loss == "wgan_gp" else 1)

    @property
    def adam_betas(self) -> tuple[float, float]:
        if self.betas is not None:
            return self.betas
        return (0.0, 0.9) if self.loss == "wgan_gp" else (0.5, 0.999)  # the two papers' settings


def depth(image_shape: tuple[int, ...], *, family: str) -> int:
    """Number of 2x up/downsamplings between the >= 4x4 start map and the image."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(
            f"{family}: image_shape must be (C, H, W) of positive sizes, got {tuple(image_shape)}"
        )
    _, h, w = image_shape
    n = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= MIN_START:
        h, w, n = h // 2, w // 2, n + 1
    if n == 0:
        raise ValueError(
            f"{family}: image size {image_shape[1]}x{image_shape[2]} must be even and at least 8"
        )
    return n


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN sec. 4: weights from N(0, 0.02); BatchNorm gains from N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (B, latent_dim), classes y (B,) or None -> images (B, C, H, W) in (-1, 1)."""

    def __init__(self, cfg: GANConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        n = depth(image_shape, family=cfg.family)
        c, h, w = image_shape
        widths = [cfg.g_channels * 2**i for i in reversed(range(n))]  # e.g. 256, 128, 64 for n = 3
        self.start = (widths[0], h // 2**n, w // 2**n)
        self.latent_dim, self.num_classes, self.image_shape = cfg.latent_dim, num_classes, (c, h, w)
        # The class also enters with z (cGAN, Mirza & Osindero 2014): per-class BatchNorm gains alone
        # move slowly (one embedding row per class) and left samples nearly class-blind in our runs.
        self.embed = nn.Embedding(num_classes, cfg.latent_dim) if num_classes else None
        z_in = cfg.latent_dim * (2 if num_classes else 1)
        self.project = nn.Linear(z_in, widths[0] * self.start[1] * self.start[2], bias=False)
        self.norms = nn.ModuleList([CondBatchNorm(widths[0], num_classes=num_classes)])
        self.ups = nn.ModuleList()
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            self.ups.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False))
            self.norms.append(CondBatchNorm(c_out, num_classes=num_classes))
        self.out = nn.ConvTranspose2d(widths[-1], c, 4, stride=2, padding=1)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.project(z).view(-1, *self.start)  # (B, c0*h0*w0) -> (B, c0, h0, w0)
        h = F.relu(self.norms[0](h, y))
        for up, norm in zip(self.ups, self.norms[1:], strict=True):
            h = F.relu(norm(up(h), y))
        return torch.tanh(self.out(h))


class Discriminator(nn.Module):
    """Images (B, C, H, W) and classes (B,) (-1: no projection term) -> logits (B,)."""

    def __init__(self, cfg: GANConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        n = depth(image_shape, family=cfg.family)
        c, h, w = image_shape
        layers: list[nn.Module] = [nn.Conv2d(c, cfg.d_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = cfg.d_channels
        for _ in range(n - 1):
            layers.append(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1))
            width *= 2
            if cfg.d_norm == "layer":  # one group: LayerNorm over (C, H, W), per sample
                layers.append(group_norm(width, max_groups=1))
            layers.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*layers)
        self.mbstd_group = cfg.d_mbstd_group
        extra = 1 if self.mbstd_group else 0  # the minibatch-std feature map
        self.psi = nn.Linear((width + extra) * (h // 2**n) * (w // 2**n), 1)  # DCGAN's last conv over the map
        self.embed = nn.Embedding(num_classes, width) if num_classes else None
        _dcgan_init(self)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if cfg.d_spectral_norm:  # after the init: the parametrization keeps the raw weight as `original`
            for m in [*self.features, self.psi]:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    spectral_norm(m)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, *, parts: int = 1) -> torch.Tensor:
        """`parts`: x is that many equal batches concatenated (real, fake, ...); std groups stay inside one."""
        phi = self.features(x)  # (B, width, h0, w0)
        head = phi
        if self.mbstd_group:
            head = torch.cat([phi, minibatch_std(phi, group=self.mbstd_group, parts=parts)], dim=1)
        out = self.psi(head.flatten(1)).squeeze(1)
        if self.embed is not None and y is not None:
            labelled = y >= 0
            proj = (self.embed(y.clamp_min(0)) * phi.sum(dim=(2, 3))).sum(1)  # projection, eq. 3
            out = out + torch.where(labelled, proj, torch.zeros_like(proj))
        return out


def _truncated_normal(
    shape: tuple[int, int], *, truncation: float | None, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """N(0, I) noise, or restricted to [-t, t] by the inverse CDF (BigGAN's truncation trick)."""
    if truncation is None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    lo = torch.special.ndtr(torch.tensor(-float(truncation), dtype=torch.float64))
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return torch.special.ndtri(lo + u * (1 - 2 * lo)).float().to(device)


class GANTask(Task):
    """Phases "discriminator" (n_critic repeats) then "generator"; EMA and export of `generator`."""

    ema_module = "generator"

    def __init__(
        self, model: GANConfig, loop: LoopConfig, *, image_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        depth(image_shape, family=model.family)
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes} must be >= 0 (0: unconditional)")
        self.cfg, self.loop = model, loop
        self.image_shape, self.num_classes = tuple(int(s) for s in image_shape), num_classes
        self.phases = (
            Phase("discriminator", "discriminator", repeats=model.critic_repeats),
            Phase("generator", "generator"),
        )
        self.device = torch.device("cpu")

    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        self.device = torch.device(device)
        kw = dict(image_shape=self.image_shape, num_classes=self.num_classes)
        self.modules = {
            "generator": Generator(self.cfg, **kw).to(self.device),
            "discriminator": Discriminator(self.cfg, **kw).to(self.device),
        }
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        lr, betas = self.loop.lr, self.cfg.adam_betas
        return {
            "generator": torch.optim.Adam(self.modules["generator"].parameters(), lr=lr, betas=betas),
            "discriminator": torch.optim.Adam(
                self.modules["discriminator"].parameters(), lr=lr * self.cfg.d_lr_ratio, betas=betas
            ),
        }

    def _labels(
        self, labels: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """Classes for the fakes: the real batch's where labelled, uniform draws elsewhere."""
        if not self.num_classes:
            return None
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in 0..{self.num_classes - 1} or be -1 (unlabelled), "
                f"got {int(labels.min())}..{int(labels.max())}"
            )
        drawn = torch.randint(self.num_classes, labels.shape, generator=generator, device=labels.device)
        return torch.where(labels >= 0, labels, drawn)

    def _noise(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, generator=generator, device=self.device)

    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, labels = batch["image"], batch["label"]
        y_fake = self._labels(labels)
        z = self._noise(x.shape[0])
        if phase == "discriminator":
            return self._discriminator_step(x, labels if self.num_classes else None, y_fake, z)
        if phase == "generator":
            return self._generator_step(z, y_fake)
        raise ValueError(f"unknown phase {phase!r}; valid: ['discriminator', 'generator']")

    def _generator_step(
        self, z: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_G, plus lambda / (d_I / d_z) with d the mean |difference| of pairs that share a class."""
        h = z.shape[0] // 2 if self.cfg.mode_seeking > 0 else 0
        if h and y is not None:  # sample i + h asks for sample i's class
            y = torch.cat([y[:h], y[:h], y[2 * h :]])
        fake = self.wrapped["generator"](z, y)
        loss = adversarial.generator_loss(self.cfg.loss, self._frozen_disc(fake, y))
        metrics = {"g_loss": loss.detach()}
        if h:  # Mao et al. 2019, eq. 3: a generator that ignores z within a class pays 1 / ratio
            ratio = adversarial.mode_seeking(fake, z, pairs=h)
            loss = loss + self.cfg.mode_seeking / (ratio + 1e-5)
            metrics["ms_ratio"] = ratio.detach()
        return loss, metrics

    def _frozen_disc(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Discriminator scores with gradients to the input only (raw module, detached weights)."""
        disc = self.modules["discriminator"]
        params = {k: v.detach() for k, v in disc.named_parameters()}
        return functional_call(disc, params, (diff_augment(x, self.cfg.d_augment), y))

    def _discriminator_step(
        self, x: torch.Tensor, y_real: torch.Tensor | None, y_fake: torch.Tensor | None, z: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():  # raw generator: its DDP reducer stays out of this phase
            fake = self.modules["generator"](z, y_fake)
        b = x.shape[0]
        if self.cfg.loss == "ns":
            r1 = self.cfg.r1_weight > 0
            x = x.detach().requires_grad_(True) if r1 else x
            y = None if y_real is None else torch.cat([y_real, y_fake])
            both = diff_augment(torch.cat([x, fake]), self.cfg.d_augment)
            real_s, fake_s = self.wrapped["discriminator"](both, y, parts=2).split(b)
            return adversarial.ns_discriminator(real_s, fake_s, x=x, r1_weight=self.cfg.r1_weight)
        if self.cfg.d_augment:  # the critic's Lipschitz constraint holds between the images it sees
            x, fake = diff_augment(torch.cat([x, fake]), self.cfg.d_augment).split(b)
        eps = torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype)
        x_hat = (eps * x + (1 - eps) * fake).detach().requires_grad_(True)
        y = None if y_real is None else torch.cat([y_real, y_fake, y_fake])  # x_hat: the fake's class
        real_s, fake_s, hat_s = self.wrapped["discriminator"](torch.cat([x, fake, x_hat]), y, parts=3).split(
            b
        )
        return adversarial.wgan_critic(real_s, fake_s, hat_s, x_hat, gp_weight=self.cfg.gp_weight)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation losses on fixed noise: d_loss and g_loss (ns) or wasserstein and g_loss (wgan_gp)."""
        generator = torch.Generator(device=self.device).manual_seed(0)
        gen, disc = self.modules["generator"], self.modules["discriminator"]
        sums, count = {"real": 0.0, "fake": 0.0, "g": 0.0}, 0
        for batch in batches:
            x, labels = batch["image"].to(self.device), batch["label"].to(self.device)
            y_fake = self._labels(labels, generator=generator)
            real = disc(x, labels if self.num_classes else None)
            fake = disc(gen(self._noise(x.shape[0], generator=generator), y_fake), y_fake)
            if self.cfg.loss == "ns":
                real, fake, g = F.softplus(-real), F.softplus(fake), F.softplus(-fake)
            else:
                g = -fake
            sums["real"] += float(real.sum())
            sums["fake"] += float(fake.sum())
            sums["g"] += float(g.sum())
            count += x.shape[0]
        if count == 0:
            raise ValueError("evaluate got no validation samples")
        m = {k: v / count for k, v in sums.items()}
        if self.cfg.loss == "ns":
            return {"d_loss": m["real"] + m["fake"], "g_loss": m["g"]}
        return {"wasserstein": m["real"] - m["fake"], "g_loss": m["g"]}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor:
        y = progress_labels(n, num_classes=self.num_classes, device=self.device)
        return self.modules["generator"](self._noise(n, generator=generator), y)


class GANGenerator(ZooGenerator):
    """A loaded DCGAN / WGAN-GP generator (eval mode: BatchNorm uses its running statistics).

    G(z, y); option truncation: null (plain N(0, I)) or t > 0 (z restricted to [-t, t]).
    """

    option = "truncation"

    def draw(
        self, y: torch.Tensor | None, *, n: int, generator: torch.Generator, truncation: float | None
    ) -> torch.Tensor:
        z = _truncated_normal(
            (n, self.net.latent_dim), truncation=truncation, generator=generator, device=self.device
        )
        return self.net(z, y).clamp(-1, 1)


def export(path: str | Path, *, config: GANConfig, truncation: float | None = None, **model: Any) -> None:
    """Write the generator (`state`: the `generator` module's) as family "gan" or "wgan" (config.loss)."""
    export_zoo(path, family=config.family, config=config, sampling={"truncation": truncation}, **model)


def load(model_dir: str | Path, *, device: torch.device) -> GANGenerator:
    """Rebuild an exported generator in eval mode on `device`."""
    return load_zoo(
        model_dir, device=device, config_cls=GANConfig, network=Generator, generator_cls=GANGenerator
    )
