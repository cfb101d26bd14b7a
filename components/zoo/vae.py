"""Class-conditional VAE with a discretized Gaussian decoder (Kingma & Welling 2014; Sohn et al. 2015).

The conditional ELBO (CVAE, Sohn et al. 2015, eq. 4; Kingma & Welling 2014, eq. 3),
    log p(x|y) >= E_q(z|x,y)[log p(x|z,y)] - KL(q(z|x,y) || N(0, I)),
with z = mu + sigma * eps, eps ~ N(0, I) (the reparameterisation, Kingma & Welling eq. 10), and the
training loss rec + beta * KL (beta-VAE, Higgins et al. 2017) per image in bits/dim. `bits_per_dim`
is the negative ELBO (beta = 1) in bits/dim with one z draw: an upper bound on the true NLL.

Likelihood: a discretized Gaussian over the 256 levels (Ho et al. 2020, eq. 13; the helper in
components/evaluation/likelihood.py) with the decoder's mean and a learned per-channel log-scale
(the calibrated decoder of sigma-VAE, Rybkin et al. 2021). Why: a learned scale weighs
reconstruction against KL by maximum likelihood instead of a hand-set MSE weight, so beta keeps its
meaning; one scale per channel (not per pixel) leaves the decoder a single output head and stays
stable on the saturated -1 background, whose edge bin takes all the mass below it; discretizing
makes the bound one on the 8-bit data, comparable with PixelCNN's and the flow's bits/dim. A
discretized logistic (Salimans et al. 2017) would serve as well; the Gaussian helper is shared.
Samples are the decoder mean at z ~ N(0, T^2 I) (the noise of p(x|z) would only add grain).

Prior: N(0, I), or (`prior: fitted`) a Gaussian per class with a full covariance,
p(z|y) = N(m_y, L_y L_y^T), fitted after training to the encoder means of the train split (the
ex-post density estimate of Ghosh et al. 2020, one Gaussian per class) and stored with the model;
training itself is the plain conditional ELBO against N(0, I). Why: a VAE's samples are only as good
as the match between the prior and the codes the encoder gives real images (the aggregate
posterior). On glyphs at 32x32 RGB (beta 1, a 64-dim latent) the decoder reconstructs the train
images at 11.6x the FD floor and 92.8% conditional accuracy, yet z ~ N(0, I) draws blobs at chance:
the encoder writes the class into z and the decoder turns class-blind. The codes of a class are
strongly correlated: a diagonal Gaussian per class still draws at chance, a full one reaches 55x and
26%. A prior learned jointly by the KL term (a table of means and Cholesky factors per class) did
worse (73x, 14%): with ~2.5 images of a class per batch its covariance lags the encoder. The
negative ELBO (`bits_per_dim`) is computed against the prior the model samples from: any prior
gives a bound. Samples draw z = m_y + T L_y eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from components.evaluation.likelihood import LEVELS, discretized_gaussian_log_likelihood, to_levels
from components.nn.blocks import Downsample, ResBlock, Upsample, group_norm
from components.schema import StrictConfig
from components.training.config import LoopConfig
from components.training.task import Batch, Phase, Task, Wrap
from components.zoo.common import (
    ZooGenerator,
    adamw,
    check_image_shape,
    embedding_rows,
    export_zoo,
    label_rows,
    load_zoo,
    marginal_nll,
    progress_labels,
    randn,
)

FAMILY = "vae"


class VAEConfig(StrictConfig):
    """Encoder/decoder sizes, latent size and the KL weight."""

    channels: int = Field(default=64, ge=8, description="base width; level i has channels * channel_mult[i]")
    channel_mult: tuple[int, ...] = Field(default=(1, 2), min_length=1, description="one per 2x downsampling")
    num_res_blocks: int = Field(default=1, ge=1)
    latent_dim: int = Field(default=32, ge=1, description="size of the vector latent z")
    beta: float = Field(default=1.0, gt=0, description="KL weight; 1 is the ELBO (Higgins et al. 2017)")
    log_scale_init: float = Field(default=-2.0, description="initial per-channel log sigma of p(x|z)")
    min_log_scale: float = Field(default=-7.0, description="floor of log sigma, far below the bin width")
    prior: Literal["normal", "fitted"] = Field(
        default="normal",
        description="p(z|y) of the samples: N(0, I), or a Gaussian per class fitted to the codes after training",
    )


class VAE(nn.Module):
    """q(z|x,y) and p(x|z,y) over images (B, C, H, W) in [-1, 1], a vector latent (B, latent_dim)."""

    def __init__(self, cfg: VAEConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        levels = len(cfg.channel_mult)
        c, h, w = check_image_shape(
            image_shape, multiple=2**levels, family=FAMILY, why=f"{levels} downsamplings (len(channel_mult))"
        )
        self.cfg, self.image_shape, self.num_classes = cfg, (c, h, w), num_classes
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.top = (widths[-1], h // 2**levels, w // 2**levels)
        rows = embedding_rows(num_classes)
        # Encoder: a per-class bias on the first feature map; decoder: the class vector beside z.
        self.enc_embed = nn.Embedding(rows, cfg.channels) if rows else None
        self.dec_embed = nn.Embedding(rows, cfg.latent_dim) if rows else None
        enc: list[nn.Module] = []
        c_in = cfg.channels
        for width in widths:
            for _ in range(cfg.num_res_blocks):
                enc.append(ResBlock(c_in, width))
                c_in = width
            enc.append(Downsample(width))
        self.enc_in = nn.Conv2d(c, cfg.channels, 3, padding=1)
        self.enc = nn.Sequential(*enc, group_norm(c_in), nn.SiLU(), nn.Flatten())
        self.enc_out = nn.Linear(math.prod(self.top), 2 * cfg.latent_dim)
        dec_in = cfg.latent_dim * (2 if rows else 1)
        self.dec_in = nn.Linear(dec_in, math.prod(self.top))
        dec: list[nn.Module] = []
        for width in reversed(widths):
            dec.append(Upsample(c_in))
            for _ in range(cfg.num_res_blocks):
                dec.append(ResBlock(c_in, width))
                c_in = width
        self.dec = nn.Sequential(*dec, group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c, 3, padding=1))
        self.log_scale = nn.Parameter(torch.full((c,), cfg.log_scale_init))
        if cfg.prior == "fitted":  # one row per embedding row (one when unconditional); N(0, I) until fitted
            k, d = max(rows, 1), cfg.latent_dim
            self.register_buffer("prior_mean", torch.zeros(k, d))
            self.register_buffer("prior_tril", torch.eye(d).repeat(k, 1, 1))

    def _rows(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long, device=self.log_scale.device) if y is None else y

    def prior(self, y: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (n, latent_dim), scale_tril L (n, latent_dim, latent_dim)) of p(z|y); y: rows or None."""
        d, device = self.cfg.latent_dim, self.log_scale.device
        if self.cfg.prior == "normal":
            return torch.zeros(n, d, device=device), torch.eye(d, device=device).expand(n, d, d)
        rows = self._rows(y, n)
        return self.prior_mean[rows], self.prior_tril[rows]

    def encode(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma^2) of q(z|x,y), each (B, latent_dim); y: embedding rows or None."""
        h = self.enc_in(x)
        if self.enc_embed is not None:
            h = h + self.enc_embed(y)[:, :, None, None]
        mu, logvar = self.enc_out(self.enc(h)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Mean of p(x|z,y), (B, C, H, W)."""
        if self.dec_embed is not None:
            z = torch.cat([z, self.dec_embed(y)], dim=1)
        return self.dec(self.dec_in(z).view(-1, *self.top))  # (B, c*h*w) -> (B, c, h, w)

    def terms(
        self, x: torch.Tensor, y: torch.Tensor | None, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image -log p(x|z,y) and KL(q || p(z|y)), in nats, (B,) each; z = mu + sigma * eps."""
        x = to_levels(x).to(x.dtype) * (2 / (LEVELS - 1)) - 1  # onto the 8-bit grid the bins assume
        mu, logvar = self.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * eps
        mean = self.decode(z, y)
        log_scale = self.log_scale.clamp_min(self.cfg.min_log_scale)[None, :, None, None].expand_as(mean)
        rec = -discretized_gaussian_log_likelihood(x, mean=mean, log_scale=log_scale).flatten(1).sum(1)
        kl = self.kl(mu, logvar, y)
        return rec.to(x.dtype), kl

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """KL(N(mu, diag e^logvar) || p(z|y)) per image (B,), in nats, in closed form:
        (tr(S^-1 V) + (mu - m)^T S^-1 (mu - m) - d + log|S| - log|V|) / 2 with S = L L^T, V = diag e^logvar
        (for N(0, I): Kingma & Welling app. B)."""
        if self.cfg.prior == "normal":
            return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        rows, d = self._rows(y, mu.shape[0]), mu.shape[1]
        eye = torch.eye(d, device=mu.device)
        inv = torch.linalg.solve_triangular(self.prior_tril, eye, upper=False)[rows]  # one inverse a row
        trace = (inv.pow(2) * logvar.exp()[:, None, :]).sum((1, 2))  # sum_ij (L^-1)_ij^2 v_j
        maha = (inv @ (mu - self.prior_mean[rows])[:, :, None]).squeeze(2).pow(2).sum(1)
        log_det = 2 * torch.diagonal(self.prior_tril, dim1=1, dim2=2).log().sum(1)[rows]
        return 0.5 * (trace + maha - d + log_det - logvar.sum(1))

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)


def _to_bpd(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    return nats / (num_dims * math.log(2))


class VAETask(Task):
    """Minimises (rec + beta * KL) in bits/dim with AdamW; `vae` is the module to average and export."""

    phases = (Phase("main", "main"),)
    ema_module = "vae"

    def __init__(
        self, model: VAEConfig, loop: LoopConfig, *, image_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        self.cfg, self.loop, self.num_classes = model, loop, num_classes
        self.image_shape = check_image_shape(
            image_shape,
            multiple=2 ** len(model.channel_mult),
            family=FAMILY,
            why="len(channel_mult) downsamplings",
        )
        embedding_rows(num_classes)
        self.device = torch.device("cpu")

    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        self.device = torch.device(device)
        vae = VAE(self.cfg, image_shape=self.image_shape, num_classes=self.num_classes)
        self.modules = {"vae": vae.to(self.device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return adamw(self.modules["vae"], self.loop)

    def _bpd(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x = batch["image"]
        y = label_rows(batch.get("label"), num_classes=self.num_classes)
        eps = torch.randn(
            (x.shape[0], self.cfg.latent_dim), generator=generator, device=x.device, dtype=x.dtype
        )
        rec, kl = self.wrapped["vae"].terms(x, y, eps)
        d = math.prod(self.image_shape)
        return {"rec": _to_bpd(rec, d), "kl": _to_bpd(kl, d)}

    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if phase != "main":
            raise ValueError(f"unknown phase {phase!r}; valid: ['main']")
        t = self._bpd(batch)
        loss = (t["rec"] + self.cfg.beta * t["kl"]).mean()
        sigma = self.modules["vae"].log_scale.detach().exp().mean()
        return loss, {
            "bpd": (t["rec"] + t["kl"]).detach().mean(),
            "rec_bpd": t["rec"].detach().mean(),
            "kl_bpd": t["kl"].detach().mean(),
            "sigma": sigma,
        }

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Negative ELBO (bpd), its reconstruction and KL parts, in bits/dim, one fixed z draw each."""
        generator = torch.Generator(device=self.device).manual_seed(0)  # the same draws every validation
        sums, count = {"bpd": 0.0, "rec_bpd": 0.0, "kl_bpd": 0.0}, 0
        for batch in batches:
            t = self._bpd({k: v.to(self.device) for k, v in batch.items()}, generator=generator)
            sums["bpd"] += float((t["rec"] + t["kl"]).sum())
            sums["rec_bpd"] += float(t["rec"].sum())
            sums["kl_bpd"] += float(t["kl"].sum())
            count += t["rec"].numel()
        if count == 0:
            raise ValueError("evaluate got no validation samples")
        return {k: v / count for k, v in sums.items()}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor:
        """Decoder means at prior draws, classes 0, 1, .. in turn."""
        y = label_rows(
            progress_labels(n, num_classes=self.num_classes, device=self.device), num_classes=self.num_classes
        )
        return _sample(self.modules["vae"], y, n=n, generator=generator, temperature=1.0)


def _sample(
    vae: VAE, y: torch.Tensor | None, *, n: int, generator: torch.Generator, temperature: float
) -> torch.Tensor:
    m, tril = vae.prior(y, n)
    eps = randn((n, vae.cfg.latent_dim), generator=generator, device=m.device) * temperature
    z = m + (tril @ eps[:, :, None]).squeeze(2)
    return vae.decode(z, y).clamp(-1, 1)


FIT_IMAGES = 100_000  # train codes the prior's fit reads at most (its sums are exact; bounds a huge split)
RIDGE = 1e-3  # added to a fitted covariance's diagonal, times the mean variance of all codes


@torch.no_grad()
def fit_prior(
    vae: VAE, data: Iterable[tuple[torch.Tensor, torch.Tensor]], *, max_images: int = FIT_IMAGES
) -> int:
    """Fit the `fitted` prior of `vae` to its encoder means over `data` ((images, labels) batches); the
    number of images read.

    Per embedding row: the codes' mean and covariance (sums in float64), a ridge on the diagonal (a
    class with fewer images than latent dimensions has a singular covariance), its Cholesky factor. A
    row with fewer than 2 codes (a class absent from the split, the "no label" row of fully labelled
    data) takes the fit of all codes.
    """
    if vae.cfg.prior != "fitted":
        raise ValueError(f"fit_prior: this VAE samples from prior={vae.cfg.prior!r}; set prior: fitted")
    rows, d = vae.prior_mean.shape
    device = vae.log_scale.device
    count = torch.zeros(rows, dtype=torch.float64, device=device)
    s1 = torch.zeros(rows, d, dtype=torch.float64, device=device)
    s2 = torch.zeros(rows, d, d, dtype=torch.float64, device=device)
    seen = 0
    for images, labels in data:
        images, labels = images[: max_images - seen].to(device), labels[: max_images - seen].to(device)
        y = label_rows(labels, num_classes=vae.num_classes)
        mu = vae.encode(images.float(), y)[0].double()
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("fit_prior: the encoder gave non-finite codes (NaN/inf weights or images)")
        r = torch.zeros_like(labels) if y is None else y
        count.index_add_(0, r, torch.ones_like(mu[:, 0]))
        s1.index_add_(0, r, mu)
        s2.index_add_(0, r, mu[:, :, None] * mu[:, None, :])
        seen += images.shape[0]
        if seen >= max_images:
            break
    if seen < 2:
        raise ValueError(f"fit_prior: the prior needs at least 2 training images, got {seen}")

    def gaussian(n: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = t1 / n
        return mean, (t2 - n * torch.outer(mean, mean)) / (n - 1)

    pooled_mean, pooled_cov = gaussian(count.sum(), s1.sum(0), s2.sum(0))
    ridge = (
        RIDGE
        * torch.diagonal(pooled_cov).mean().clamp_min(1e-12)
        * torch.eye(d, dtype=torch.float64, device=device)
    )
    for k in range(rows):
        mean, cov = gaussian(count[k], s1[k], s2[k]) if count[k] >= 2 else (pooled_mean, pooled_cov)
        vae.prior_mean[k] = mean.float()
        vae.prior_tril[k] = torch.linalg.cholesky(cov + ridge).float()
    return seen


def fit_exported(
    state: dict[str, torch.Tensor],
    *,
    config: VAEConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    data: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """The state to export: with `prior: fitted`, the trained weights' prior fitted to `data()` (the
    train split's batches); otherwise `state` as it is."""
    if config.prior != "fitted":
        return state
    vae = VAE(config, image_shape=image_shape, num_classes=num_classes)
    vae.load_state_dict(state)
    n = fit_prior(vae.eval(), data())
    print(f"{FAMILY}: prior fitted to the codes of {n} training images", flush=True)
    return vae.state_dict()


class VAEGenerator(ZooGenerator):
    """A loaded VAE: decoder means at z = m_y + T L_y eps (N(0, T^2 I) with the normal prior; option
    `temperature` T), the negative-ELBO bits/dim."""

    option = "temperature"

    def draw(
        self, y: torch.Tensor | None, *, n: int, generator: torch.Generator, temperature: float
    ) -> torch.Tensor:
        return _sample(self.net, y, n=n, generator=generator, temperature=temperature)

    @torch.no_grad()
    def bits_per_dim(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Negative ELBO in bits/dim, (n,), of images in [-1, 1] under the uniform class mixture."""
        x = images.to(self.device).float()
        eps = randn((x.shape[0], self.net.cfg.latent_dim), generator=generator, device=self.device)

        def nll(y: torch.Tensor | None) -> torch.Tensor:
            rec, kl = self.net.terms(x, y, eps)
            return rec + kl

        nats = marginal_nll(nll, n=x.shape[0], num_classes=self.num_classes, device=self.device)
        return _to_bpd(nats, self.net.num_dims)


def export(path: str | Path, *, temperature: float = 1.0, **model: Any) -> None:
    """Write the VAE (`state`: the `vae` module's, EMA-averaged where kept; `config`, `image_shape`,
    `num_classes`) as a generator folder."""
    export_zoo(path, family=FAMILY, sampling={"temperature": temperature}, **model)


def load(model_dir: str | Path, *, device: torch.device) -> VAEGenerator:
    """Rebuild an exported VAE in eval mode on `device`."""
    return load_zoo(model_dir, device=device, config_cls=VAEConfig, network=VAE, generator_cls=VAEGenerator)
