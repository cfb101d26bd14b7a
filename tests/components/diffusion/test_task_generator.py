"""DiffusionTask in the plain-process training loop, and export -> load_generator round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.diffusion.config import DiffusionConfig, SamplingConfig
from components.diffusion.generator import DiffusionGenerator, export
from components.diffusion.task import DiffusionTask
from components.generators import TOKENIZER_DIR, load_generator
from components.io import save_model
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.vqgan import VQGAN
from components.training.config import LoopConfig
from components.training.loop import train

torch.set_num_threads(1)

TINY = {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": ()}
LOOP = LoopConfig(steps=4, batch_size=8, lr=1e-3, ema_decay=0.9, log_every=2, sample_every=4)
FAST = SamplingConfig(sampler="heun", steps=3)


def _model(objective: str = "edm", *, num_classes: int = 3, in_channels: int = 1, **kw) -> DiffusionConfig:
    return DiffusionConfig(
        objective=objective, backbone={**TINY, "num_classes": num_classes, "in_channels": in_channels}, **kw
    )


def _batches(key: str = "image", *, shape=(1, 8, 8), n: int = 32):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(n, *shape, generator=g) * 2 - 1
    labels = torch.randint(-1, 3, (n,), generator=g)  # includes unlabelled (-1)

    def batches(epoch: int):
        return [{key: data[i : i + 8], "label": labels[i : i + 8]} for i in range(0, n, 8)]

    return batches


@pytest.mark.parametrize(
    ("objective", "sampling"),
    [
        ("edm", FAST),
        ("ddpm", SamplingConfig(sampler="ddpm", discretization="trailing", steps=20)),
        ("flow", SamplingConfig(sampler="euler", discretization="linspace", steps=10)),
    ],
)
def test_task_trains_validates_and_samples(objective: str, sampling: SamplingConfig) -> None:
    task = DiffusionTask(_model(objective), LOOP, sampling=sampling, num_classes=3)
    grids: list[torch.Tensor] = []
    batches = _batches()
    metrics = train(
        task,
        loop=LOOP,
        batches=batches,
        device=torch.device("cpu"),
        val_batches=lambda: batches(0),
        sample_sink=lambda images, step: grids.append(images),
        num_samples=4,
        progress=False,
    )
    assert torch.isfinite(torch.tensor(metrics["main/loss"])) and metrics["main/loss"] > 0
    assert {"main/denoise_mse", "val/loss"} <= set(metrics)
    assert len(grids) == 1 and grids[0].shape == (4, 1, 8, 8) and grids[0].abs().max() <= 1
    with torch.no_grad():
        first, again = task.evaluate(batches(0)), task.evaluate(batches(0))
    assert first == again  # seeded sigma and noise: comparable across evaluations


def test_task_on_latents_standardises_and_does_not_sample() -> None:
    mean, std = [0.5, -0.5, 0.0, 1.0], [2.0, 1.0, 0.5, 1.0]
    task = DiffusionTask(
        _model(num_classes=0, in_channels=4),
        LOOP,
        sampling=FAST,
        input_key="latent",
        latent_mean=mean,
        latent_std=std,
    )
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    z = torch.randn(2, 4, 4, 4) * torch.tensor(std).reshape(1, 4, 1, 1) + torch.tensor(mean).reshape(
        1, 4, 1, 1
    )
    x0, labels = task._inputs({"latent": z, "label": torch.tensor([1, 2])})
    assert labels is None  # unconditional: labels ignored
    assert torch.allclose(
        x0, (z - torch.tensor(mean).reshape(1, 4, 1, 1)) / torch.tensor(std).reshape(1, 4, 1, 1)
    )
    loss, diag = task.step("main", {"latent": z, "label": torch.tensor([1, 2])}, step=0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert task.sample(2, generator=torch.Generator()) is None


def test_task_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="input_key='tokens' is not valid; choose one of: image, latent"):
        DiffusionTask(_model(), LOOP, input_key="tokens", num_classes=3)
    with pytest.raises(ValueError, match="num_classes=0 must equal model.backbone.num_classes=3"):
        DiffusionTask(_model(), LOOP, num_classes=0)
    with pytest.raises(ValueError, match="objective=edm cannot sample with sampler=ddpm"):
        DiffusionTask(
            _model(), LOOP, sampling=SamplingConfig(sampler="ddpm", discretization="trailing"), num_classes=3
        )
    with pytest.raises(ValueError, match="latent_std must hold|latent_std must be a float or 1 per-channel"):
        DiffusionTask(_model(), LOOP, num_classes=3, latent_std=[1.0, 2.0])


def _export_pixel(path: Path, *, objective: str = "edm", sampling: SamplingConfig = FAST) -> DiffusionConfig:
    torch.manual_seed(0)
    model = _model(objective)
    from components.diffusion.precond import build_denoiser

    denoiser = build_denoiser(model)
    for name, param in denoiser.net.named_parameters():  # undo the zero inits: labels must matter
        if name.startswith("out.") or ".conv2." in name:
            torch.nn.init.normal_(param, std=0.02)
    export(
        path,
        denoiser_state=denoiser.state_dict(),
        model=model,
        sampling=sampling,
        image_shape=(1, 8, 8),
        num_classes=3,
    )
    return model


def test_export_load_round_trip_gives_identical_samples(tmp_path: Path) -> None:
    _export_pixel(tmp_path / "m")
    gen = load_generator(tmp_path / "m")
    assert isinstance(gen, DiffusionGenerator)
    assert gen.num_classes == 3 and gen.image_shape == (1, 8, 8)
    assert gen.default_options["sampler"] == "heun" and gen.default_options["steps"] == 3
    labels = torch.tensor([0, 1, 2, 0])
    a = gen.sample(labels, generator=torch.Generator().manual_seed(0))
    b = load_generator(tmp_path / "m").sample(labels, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    guided = gen.sample(labels, generator=torch.Generator().manual_seed(0), guidance=2.0)
    assert not torch.equal(a, guided)
    uncond = gen.sample(2, generator=torch.Generator().manual_seed(0))  # the empty class
    assert uncond.shape == (2, 1, 8, 8)
    assert gen.nfe() == 5 and gen.nfe(sampler="euler", steps=7) == 7


def test_generator_options_are_validated_in_one_line(tmp_path: Path) -> None:
    _export_pixel(tmp_path / "m")
    gen = load_generator(tmp_path / "m")
    g = torch.Generator()
    with pytest.raises(ValueError, match="diffusion: unknown sampling option 'temperature'; valid:"):
        gen.sample(2, generator=g, temperature=1.0)
    with pytest.raises(ValueError, match="objective=edm cannot sample with sampler=ddim"):
        gen.sample(2, generator=g, sampler="ddim")
    with pytest.raises(ValueError, match="diffusion: steps=0"):
        gen.sample(2, generator=g, steps=0)
    with pytest.raises(ValueError, match="eta=0.5 applies to sampler=ddim only") as err:
        gen.sample(2, generator=g, eta=0.5)
    assert "\n" not in str(err.value)


def _tiny_vqgan(path: Path) -> Path:
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
        quantizer={"kind": "vq", "codebook_size": 16, "code_dim": 4},
        loss={"perceptual_weight": 0.0, "disc": {"weight": 0.0}},
    )
    torch.manual_seed(0)
    vqgan = VQGAN(cfg)
    save_model(path, vqgan.state_dict(), vqgan.config_dict())
    return path


def test_latent_export_decodes_to_the_image_shape(tmp_path: Path) -> None:
    tokenizer = _tiny_vqgan(tmp_path / "tok")
    model = _model(num_classes=0, in_channels=4)
    from components.diffusion.precond import build_denoiser

    export(
        tmp_path / "latent",
        denoiser_state=build_denoiser(model).state_dict(),
        model=model,
        sampling=FAST,
        image_shape=(1, 16, 16),
        num_classes=0,
        latent={"mean": [0.1, 0.2, 0.3, 0.4], "std": 0.5, "shape": [4, 4, 4]},
        tokenizer_dir=tokenizer,
    )
    assert (tmp_path / "latent" / TOKENIZER_DIR / "model.safetensors").is_file()
    gen = load_generator(tmp_path / "latent")
    assert gen.image_shape == (1, 16, 16) and gen.num_classes == 0
    images = gen.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1
    with pytest.raises(ValueError, match="latent shape \\[3, 4, 4\\] must be \\[D=4, h, w\\]"):
        export(
            tmp_path / "bad",
            denoiser_state={},
            model=model,
            sampling=FAST,
            image_shape=(1, 16, 16),
            num_classes=0,
            latent={"mean": 0.0, "std": 1.0, "shape": [3, 4, 4]},
            tokenizer_dir=tokenizer,
        )
