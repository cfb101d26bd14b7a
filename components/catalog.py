"""One catalog of every trained model and every stage: the names the rest of genpipe reads.

A trained model is one `ModelSpec` row: its folder under models/, its registered name, the stage
(and DVC `foreach` key) that trains it, what it trains on, the code its judge depends on and, for
`train_zoo`, its recipe (params section, task, export and registry knobs: a ZooFamily). A
stage is one `StageSpec`. The CLI's commands and choices, the stage server's preload list, the
launcher's fast path, report labels, registry names, repro headlines and the results table read
them; tests/test_catalog.py checks dvc.yaml against them. Adding a family is one component module
plus one row here (docs/generators.md, "Add a family").

Standard library only: `genpipe`'s launcher imports this before deciding whether to import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import KW_ONLY, dataclass
from typing import Any

IMAGES, TOKENS = "data/processed", "data/tokens"  # the two prepared data sets models train on
TOKENIZER = "models/tokenizer"


@dataclass(frozen=True)
class ModelSpec:
    """A trained model: where it lives, what trains it, how the registry and the reports name it."""

    name: str  # models/<name>, reports/train_<name>.json, evaluate@<name>
    family: str  # registry family: registered as genpipe-<family>
    label: str  # how tables call it
    _: KW_ONLY
    stage: str  # the stage that trains it
    variant: str | None = None  # its key in the stage's params section and DVC `foreach`
    data: str = IMAGES  # the prepared data it trains on
    inputs: tuple[str, ...] = ()  # further trained inputs whose content defines the run
    code: str | None = None  # components package holding its generator (None: not a generator)
    recipe: str | None = None  # "module:NAME" of how its stage trains it (train_zoo: a ZooFamily)

    @property
    def registered(self) -> str:
        return f"genpipe-{self.family}"

    @property
    def folder(self) -> str:
        return f"models/{self.name}"

    @property
    def command(self) -> str:
        return f"{self.stage}@{self.variant}" if self.variant else self.stage

    @property
    def generator(self) -> bool:
        return self.code is not None


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("evaluator", "evaluator", "evaluator", stage="train_evaluator"),
    ModelSpec("tokenizer", "tokenizer", "VQGAN tokenizer", stage="train_tokenizer", inputs=("models/evaluator",)),
    ModelSpec("diffusion_pixel", "diffusion", "diffusion, pixel", stage="train_diffusion", variant="pixel",
              code="components/diffusion"),
    ModelSpec("diffusion_latent", "latent-diffusion", "diffusion, latent", stage="train_diffusion",
              variant="latent", data=TOKENS, inputs=(TOKENIZER,), code="components/diffusion"),
    ModelSpec("prior_gpt", "prior-gpt", "GPT prior", stage="train_prior", variant="gpt", data=TOKENS,
              inputs=(TOKENIZER,), code="components/prior"),
    ModelSpec("prior_maskgit", "prior-maskgit", "MaskGIT prior", stage="train_prior", variant="maskgit",
              data=TOKENS, inputs=(TOKENIZER,), code="components/prior"),
    ModelSpec("vae", "vae", "VAE", stage="train_zoo", variant="vae", code="components/zoo",
              recipe="components.zoo.families:VAE"),
    ModelSpec("gan", "gan", "GAN (DCGAN)", stage="train_zoo", variant="gan", code="components/zoo",
              recipe="components.zoo.families:GAN"),
    ModelSpec("wgan", "wgan", "WGAN-GP", stage="train_zoo", variant="wgan", code="components/zoo",
              recipe="components.zoo.families:WGAN"),
    ModelSpec("flow", "flow", "flow (Glow)", stage="train_zoo", variant="flow", code="components/zoo",
              recipe="components.zoo.families:FLOW"),
    ModelSpec("pixelcnn", "pixelcnn", "PixelCNN", stage="train_zoo", variant="pixelcnn", code="components/zoo",
              recipe="components.zoo.families:PIXELCNN"),
)  # fmt: skip
GENERATORS: tuple[ModelSpec, ...] = tuple(m for m in MODELS if m.generator)

#: `family` in an exported generator's config.json -> the module whose `load(model_dir, *, device)`
#: rebuilds it (components.generators.load_generator finds it here).
LOADERS: dict[str, str] = {
    "diffusion": "components.diffusion.generator",
    "prior": "components.prior.generator",
    "vae": "components.zoo.vae",
    "gan": "components.zoo.gan",
    "wgan": "components.zoo.gan",
    "flow": "components.zoo.flow",
    "pixelcnn": "components.zoo.pixelcnn",
}


@dataclass(frozen=True)
class StageSpec:
    """A DVC stage: `genpipe <name> [<variant>]`, run by the module pipelines.<name>."""

    name: str
    summary: str  # the CLI's help line
    arg: str | None = None  # the variant argument's name, for `foreach` stages
    training: bool = False  # runs Ray Train (its console ends with a timing line)

    @property
    def module(self) -> str:
        return f"pipelines.{self.name}"

    @property
    def variants(self) -> tuple[str, ...]:
        """The `foreach` keys: the variants of the models it trains, or every generator for evaluate."""
        if self.name == "evaluate":
            return tuple(m.name for m in GENERATORS)
        return tuple(m.variant for m in MODELS if m.stage == self.name and m.variant)


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "prepare", "Turn the configured image source into validated Parquet shards in data/processed/."
    ),
    StageSpec(
        "train_evaluator",
        "Train the classifier whose features every Fréchet distance, perceptual loss and accuracy uses.",
        training=True,
    ),
    StageSpec(
        "train_tokenizer",
        "Train the VQGAN image tokenizer (codebook, perceptual and adversarial losses).",
        training=True,
    ),
    StageSpec(
        "encode", "Encode every split into token grids and latents in data/tokens/ with the tokenizer."
    ),
    StageSpec(
        "train_diffusion",
        "Train a diffusion model (DDPM, DDIM, VE, EDM or flow matching) in pixel or latent space.",
        "variant",
        training=True,
    ),
    StageSpec(
        "train_prior", "Train a transformer prior over the tokenizer's codes.", "variant", training=True
    ),
    StageSpec(
        "train_zoo",
        "Train a classic family: VAE, GAN, WGAN-GP, normalizing flow or PixelCNN.",
        "variant",
        training=True,
    ),
    StageSpec(
        "evaluate",
        "Judge one generator: N samples on fixed seeds, FD, conditional accuracy, precision/recall, grid.",
        "model",
    ),
    StageSpec(
        "report",
        "Gather every evaluation into reports/evaluate.json and the results table reports/results.md.",
    ),
    StageSpec(
        "promote",
        "Move each named model's champion to its evaluated challenger when it wins the gate.",
        "model",
    ),
)


def model(name: str) -> ModelSpec:
    """The model stored in models/<name>; an unknown name is one line naming the valid ones."""
    for spec in MODELS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(m.name for m in MODELS)}")


def stage(name: str) -> StageSpec:
    """The stage called `name`; an unknown name is one line naming the valid ones."""
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown stage {name!r}; valid: {', '.join(s.name for s in STAGES)}")


def trained_by(stage_name: str, variant: str) -> ModelSpec:
    """The model a `foreach` stage trains for `variant`; an unknown one names the valid variants."""
    for spec in MODELS:
        if spec.stage == stage_name and spec.variant == variant:
            return spec
    raise ValueError(
        f"unknown {stage_name} variant {variant!r}; valid: {', '.join(stage(stage_name).variants)}"
    )


def recipe(spec: ModelSpec) -> Any:
    """The object a row's `recipe` names, imported on demand (this module imports no components)."""
    if spec.recipe is None:
        raise ValueError(f"model {spec.name!r} has no recipe; its stage {spec.stage} trains it by itself")
    module, _, attr = spec.recipe.partition(":")
    return getattr(importlib.import_module(module), attr)
