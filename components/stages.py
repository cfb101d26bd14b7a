"""Stage configs: each composes the component configs a stage wires together."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from components.diffusion.config import DiffusionStageConfig
from components.evaluation.evaluator import EvaluatorConfig
from components.generators import MODELS
from components.prior.config import PriorConfig, PriorSamplingConfig
from components.sampling_limits import limited
from components.schema import StrictConfig
from components.tokenizer.config import TokenizerConfig
from components.training.config import LoopConfig
from components.zoo.flow import FlowConfig
from components.zoo.gan import GANConfig
from components.zoo.pixelcnn import PixelCNNConfig
from components.zoo.vae import VAEConfig


class TrainEvaluatorConfig(StrictConfig):
    """The `train_evaluator` section."""

    model: EvaluatorConfig = EvaluatorConfig()
    loop: LoopConfig


class TrainTokenizerConfig(StrictConfig):
    """The `train_tokenizer` section: a VQGAN (model) trained by the loop."""

    model: TokenizerConfig
    loop: LoopConfig
    num_grid: int = Field(default=32, ge=1, le=256, description="test images in the reconstruction grid")


class EncodeConfig(StrictConfig):
    """The `encode` section: batch inference of the tokenizer over every split."""

    batch_size: int = Field(default=256, gt=0)
    num_actors: int = Field(default=1, ge=1, description="Ray Data actors, each holding one tokenizer")
    shard_rows: int = Field(default=4096, gt=0)


class EvaluateConfig(StrictConfig):
    """The `evaluate` section: how the one judge samples and scores every generator."""

    num_samples: int | None = Field(default=None, ge=10, description="null: the train split's size")
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=512, gt=0, description="images per sampling call")
    pr_k: int = Field(default=3, ge=1, description="k of improved precision/recall (paper: 3)")
    grid_columns: int = Field(default=10, ge=1, le=64, description="samples per class row of the grid")
    threads: int | None = Field(default=None, ge=1, description="torch threads; null: every core")
    device: Literal["cpu", "cuda"] = "cpu"
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per model (models/<name>): sampling options over its defaults"
    )

    @model_validator(mode="after")
    def _known_models(self) -> EvaluateConfig:
        unknown = sorted(set(self.options) - set(MODELS))
        if unknown:
            raise ValueError(f"options for unknown model {unknown[0]!r}; valid: {', '.join(MODELS)}")
        return self


class DiffusionVariantConfig(DiffusionStageConfig):
    """One variant of `train_diffusion` (pixel or latent): objective, default sampling, loop."""

    loop: LoopConfig


class TrainDiffusionConfig(StrictConfig):
    """The `train_diffusion` section: a DVC `foreach` over pixel and latent space."""

    pixel: DiffusionVariantConfig
    latent: DiffusionVariantConfig


class PriorVariantConfig(StrictConfig):
    """One variant of `train_prior` (gpt or maskgit): the prior, its default sampling, the loop."""

    model: PriorConfig
    sampling: PriorSamplingConfig = PriorSamplingConfig()
    loop: LoopConfig


class TrainPriorConfig(StrictConfig):
    """The `train_prior` section: a DVC `foreach` over the GPT and MaskGIT priors."""

    gpt: PriorVariantConfig
    maskgit: PriorVariantConfig

    @model_validator(mode="after")
    def _kinds_match(self) -> TrainPriorConfig:
        for variant in ("gpt", "maskgit"):
            kind = getattr(self, variant).model.kind
            if kind != variant:
                raise ValueError(
                    f"{variant}.model.kind={kind!r} must be {variant!r} (the variant's own kind)"
                )
        return self


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

    model: VAEConfig = VAEConfig()
    sampling: TemperatureSamplingConfig = TemperatureSamplingConfig()
    loop: LoopConfig


def _own_loss(loss: str, *, variant: str, want: str, other: str) -> str:
    if loss != want:
        raise ValueError(f"the {variant} variant trains loss {want!r}; {loss!r} is the {other} variant's")
    return loss


class NSGANConfig(GANConfig):
    """The `gan` variant's model: DCGAN's non-saturating loss only."""

    @field_validator("loss")
    @classmethod
    def _ns(cls, loss: str) -> str:
        return _own_loss(loss, variant="gan", want="ns", other="wgan")


class WGANGPConfig(GANConfig):
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

    model: FlowConfig = FlowConfig()
    sampling: TemperatureSamplingConfig = TemperatureSamplingConfig(temperature=0.7)
    loop: LoopConfig


class PixelCNNVariantConfig(StrictConfig):
    """`train_zoo.pixelcnn`: the gated PixelCNN, its default sampling, the loop."""

    model: PixelCNNConfig = PixelCNNConfig()
    sampling: TemperatureSamplingConfig = TemperatureSamplingConfig()
    loop: LoopConfig


class TrainZooConfig(StrictConfig):
    """The `train_zoo` section: a DVC `foreach` over the classic families."""

    vae: VAEVariantConfig
    gan: GANVariantConfig
    wgan: WGANVariantConfig
    flow: FlowVariantConfig
    pixelcnn: PixelCNNVariantConfig
