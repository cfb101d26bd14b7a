"""Randomly initialised tiny generators, exported as the training stages export them (seconds to build)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from components.diffusion.config import DiffusionConfig, SamplingConfig
from components.diffusion.generator import export as export_diffusion
from components.diffusion.precond import build_denoiser
from components.io import save_model
from components.prior import generator as prior_generator
from components.prior.config import GPTConfig, MaskGITConfig, PriorConfig, PriorSamplingConfig
from components.prior.task import build_prior
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.vqgan import VQGAN

CLASSES, IMAGE = 3, (1, 16, 16)
BACKBONE = {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": ()}


def pixel_diffusion(path: Path) -> Path:
    """A class-conditional EDM model on 16x16 grey images, Heun with 3 steps by default."""
    torch.manual_seed(0)
    model = DiffusionConfig(objective="edm", backbone={**BACKBONE, "num_classes": CLASSES, "in_channels": 1})
    denoiser = build_denoiser(model)
    for name, param in denoiser.net.named_parameters():  # undo the zero inits: labels must matter
        if name.startswith("out.") or ".conv2." in name:
            torch.nn.init.normal_(param, std=0.02)
    export_diffusion(
        path,
        denoiser_state=denoiser.state_dict(),
        model=model,
        sampling=SamplingConfig(sampler="heun", steps=3, guidance=1.5),
        image_shape=IMAGE,
        num_classes=CLASSES,
    )
    return path


def vqgan(path: Path, *, codebook_size: int = 16) -> Path:
    """A VQGAN with f = 4: 16x16 grey images <-> 4x4 token grids."""
    cfg = TokenizerConfig(
        autoencoder=dict(
            in_channels=1,
            channels=8,
            channel_mult=(1, 2, 2),
            downsample_factor=4,
            num_res_blocks=1,
            z_channels=8,
            attention=False,
        ),
        quantizer={"kind": "vq", "codebook_size": codebook_size, "code_dim": 4},
        loss={"perceptual_weight": 0.0, "disc": {"weight": 0.0}},
    )
    torch.manual_seed(0)
    model = VQGAN(cfg)
    save_model(path, model.state_dict(), model.config_dict())
    return path


def maskgit_prior(path: Path, *, tokenizer: Path) -> Path:
    """A two-stage model: a 1-layer MaskGIT prior over 4x4 grids carrying the tokenizer it decodes with."""
    tiny = dict(layers=1, heads=2, width=32, dropout=0.0)
    prior = PriorConfig(
        kind="maskgit", gpt=GPTConfig(**tiny), maskgit=MaskGITConfig(**tiny), label_dropout=0.0
    )
    torch.manual_seed(1)
    model = build_prior(prior, grid=(4, 4), codebook_size=16, num_classes=CLASSES)
    prior_generator.export(
        path,
        state=model.state_dict(),
        prior=prior,
        sampling=PriorSamplingConfig(steps=4, guidance=1.5),
        grid=(4, 4),
        codebook_size=16,
        num_classes=CLASSES,
        image_shape=IMAGE,
        tokenizer_dir=tokenizer,
    )
    return path


def register_tiny(
    root: Path, *, uri: str | None = None, pixel_only: bool = False, tags: dict[str, str] | None = None
) -> dict:
    """`genpipe-diffusion@champion` (pixel) and `genpipe-prior-maskgit@champion` (prior + tokenizer),
    each logged as a pyfunc model from code the way the training stages log it, in the store `uri`
    (default: a sqlite file in `root`, artefacts beside it; a server keeps its own artefact root),
    registered with `tags` (default: a git commit) as the training stage hands them over.
    """
    import uuid

    from mlflow import MlflowClient

    from components.registry.registry import log_generator, register_version, set_alias

    local = uri is None
    uri = uri or f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        f"tiny-{uuid.uuid4().hex[:8]}", artifact_location=(root / "mlartifacts").as_uri() if local else None
    )
    models = {"genpipe-diffusion": pixel_diffusion(root / "models" / "diffusion_pixel")}
    if not pixel_only:
        tokenizer = vqgan(root / "models" / "tokenizer")
        models["genpipe-prior-maskgit"] = maskgit_prior(
            root / "models" / "prior_maskgit", tokenizer=tokenizer
        )
    logged = {}
    for name, model_dir in models.items():
        run_id = client.create_run(experiment, run_name=name).info.run_id
        logged[name] = log_generator(tracking_uri=uri, run_id=run_id, model_dir=model_dir)
        sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
        given = {**(tags or {"git_commit": "abc123"}), "model_sha256": sha, **logged[name].tags}
        version = register_version(
            tracking_uri=uri, name=name, run_id=run_id, tags=given, model_id=logged[name].model_id
        )
        set_alias(tracking_uri=uri, name=name, alias="champion", version=version)
    return {"uri": uri, "models": models, "logged": logged}
