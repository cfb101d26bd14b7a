"""How `train_zoo` trains each classic family: its params section, task, export and registry knobs.

A `ZooFamily` is what a catalog row's `recipe` names (components/catalog.py): the stage builds its
`train_zoo` params section from the rows' configs, and trains, exports and tags a variant from its
family alone. A new family defines its own `ZooFamily` beside its task (docs/generators.md, "Add a
family"); the five here are the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from components.sampling_limits import limited
from components.schema import StrictConfig
from components.training.config import LoopConfig
from components.training.task import Task
from components.zoo import flow, gan, pixelcnn, vae


@dataclass(frozen=True)
class ZooFamily:
    """A family as `train_zoo` sees it.

    `config` is the variant's params section: a StrictConfig with `model` (the task's config),
    `sampling` (the default options the export writes) and `loop`. `export(out, state=, config=,
    image_shape=, num_classes=, **sampling)` writes models/<name>; `knobs(model config)` are the
    registry tags that tell two versions apart; `fit(model config, image_shape)` sets the size-like
    params left unset (null) from the prepared images, so the logged, hashed and exported config
    holds the values trained; `finish(state, config=, image_shape=, num_classes=, data=)` is the
    state to export after training, given `data()`, the train split's (images, labels) batches (the VAE's
    fitted prior; the others export the trained state as it is).
    """

    config: type[StrictConfig]
    task: type[Task]
    export: Callable[..., None]
    knobs: Callable[[Any], dict[str, object]]
    fit: Callable[[Any, tuple[int, int, int]], Any] = lambda model, image_shape: model
    finish: Callable[..., dict[str, Any]] = lambda state, **_: state

    def fit_variant(self, cfg: StrictConfig, image_shape: tuple[int, int, int]) -> StrictConfig:
        """The variant's config with its unset size-like model params fitted to the images (C, H, W)."""
        return cfg.model_copy(update={"model": self.fit(cfg.model, image_shape)})

    @property
    def sampling(self) -> type[StrictConfig]:
        """The config of the family's sampling options (what `evaluate.options` may set)."""
        return self.config.model_fields["sampling"].annotation


class TemperatureSamplingConfig(StrictConfig):
    """Default sampling of a likelihood family: latents (VAE, flow) or logits (PixelCNN) at temperature T."""

    temperature: Annotated[float, limited("temperature")] = Field(
        default=1.0, description="1: the model's own distribution"
    )


class GANSamplingConfig(StrictConfig):
    """Default sampling of a GAN: z ~ N(0, I), or truncated to [-t, t] (BigGAN's truncation trick)."""

    truncation: Annotated[float | None, limited("truncation")] = Field(
        default=None, description="null: plain N(0, I)"
    )


class VAEVariantConfig(StrictConfig):
    """`train_zoo.vae`: the conditional VAE, its default sampling, the loop."""

    model: vae.VAEConfig = vae.VAEConfig()
    sampling: TemperatureSamplingConfig = TemperatureSamplingConfig()
    loop: LoopConfig


def _own_loss(loss: str, *, variant: str, want: str, other: str) -> str:
    if loss != want:
        raise ValueError(f"the {variant} variant trains loss {want!r}; {loss!r} is the {other} variant's")
    return loss


class NSGANConfig(gan.GANConfig):
    """The `gan` variant's model: DCGAN's non-saturating loss only."""

    @field_validator("loss")
    @classmethod
    def _ns(cls, loss: str) -> str:
        return _own_loss(loss, variant="gan", want="ns", other="wgan")


class WGANGPConfig(gan.GANConfig):
    """The `wgan` variant's model: WGAN-GP only (the default loss here)."""

    loss: Literal["ns", "wgan_gp"] = "wgan_gp"

    @field_validator("loss")
    @classmethod
    def _wgan_gp(cls, loss: str) -> str:
        return _own_loss(loss, variant="wgan", want="wgan_gp", other="gan")


class GANLoopConfig(LoopConfig):
    """A GAN's loop: Adam betas come from `model.betas` (GANTask builds both optimizers from it)."""

    betas: None = Field(default=None, description="not read: GANTask takes Adam betas from model.betas")

    @field_validator("betas", mode="before")
    @classmethod
    def _not_read(cls, betas: object) -> None:
        if betas is not None:
            raise ValueError("not read by a GAN: set model.betas (null: the loss's paper values)")
        return None


class GANVariantConfig(StrictConfig):
    """`train_zoo.gan`: DCGAN (non-saturating), its default sampling, the loop."""

    model: NSGANConfig = NSGANConfig()
    sampling: GANSamplingConfig = GANSamplingConfig()
    loop: GANLoopConfig


class WGANVariantConfig(StrictConfig):
    """`train_zoo.wgan`: WGAN-GP, its default sampling, the loop."""

    model: WGANGPConfig = WGANGPConfig()
    sampling: GANSamplingConfig = GANSamplingConfig()
    loop: GANLoopConfig


class FlowVariantConfig(StrictConfig):
    """`train_zoo.flow`: Glow, its default sampling temperature (Glow's figures: 0.7), the loop."""

    model: flow.FlowConfig = flow.FlowConfig()
    sampling: TemperatureSamplingConfig = TemperatureSamplingConfig(temperature=0.7)
    loop: LoopConfig


class PixelCNNVariantConfig(StrictConfig):
    """`train_zoo.pixelcnn`: the gated PixelCNN, its default sampling, the loop."""

    model: pixelcnn.PixelCNNConfig = pixelcnn.PixelCNNConfig()
    sampling: TemperatureSamplingConfig = TemperatureSamplingConfig()
    loop: LoopConfig


def _gan_knobs(m: gan.GANConfig) -> dict[str, object]:
    knobs = {
        "loss": m.loss,
        "n_critic": m.critic_repeats,
        "betas": list(m.adam_betas),
        "mode_seeking": m.mode_seeking,
    }
    return knobs | ({"gp_weight": m.gp_weight} if m.loss == "wgan_gp" else {"d_lr_ratio": m.d_lr_ratio})


VAE = ZooFamily(
    VAEVariantConfig,
    vae.VAETask,
    vae.export,
    lambda m: {"beta": m.beta, "latent_dim": m.latent_dim, "prior": m.prior},
    finish=vae.fit_exported,
)
GAN = ZooFamily(GANVariantConfig, gan.GANTask, gan.export, _gan_knobs)
WGAN = ZooFamily(WGANVariantConfig, gan.GANTask, gan.export, _gan_knobs)
FLOW = ZooFamily(
    FlowVariantConfig,
    flow.FlowTask,
    flow.export,
    lambda m: {"levels": m.levels, "steps_per_level": m.steps_per_level},
    flow.fit_levels,
)
PIXELCNN = ZooFamily(
    PixelCNNVariantConfig,
    pixelcnn.PixelCNNTask,
    pixelcnn.export,
    lambda m: {"layers": m.layers, "channels": m.channels},
)
