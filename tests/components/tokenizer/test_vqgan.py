"""VQGAN: encode/decode shapes and consistency, config round trip, and a tiny model that learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from components.tokenizer.config import TokenizerConfig
from components.tokenizer.task import TokenizerTask
from components.tokenizer.vqgan import VQGAN
from components.training.config import LoopConfig

torch.set_num_threads(1)

QUANTIZERS = {
    "vq": {"kind": "vq", "codebook_size": 32, "code_dim": 8},
    "vq_ema": {"kind": "vq", "codebook_size": 32, "code_dim": 8, "ema": True},
    "gumbel": {
        "kind": "gumbel",
        "codebook_size": 32,
        "code_dim": 8,
        "tau_start": 1.0,
        "tau_end": 0.5,
        "anneal_steps": 100,
    },
    "fsq": {"kind": "fsq", "codebook_size": 32, "levels": [4, 4, 2]},
}


def tiny_config(quantizer: dict, **loss) -> TokenizerConfig:
    return TokenizerConfig(
        autoencoder=dict(
            in_channels=1,
            channels=16,
            channel_mult=(1, 2, 2),
            downsample_factor=4,
            num_res_blocks=1,
            z_channels=16,
            attention=False,
        ),
        quantizer=quantizer,
        loss={"perceptual_weight": 0.0, "disc": {"weight": 0.0}, **loss},
    )


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_encode_decode_shapes_and_consistency(kind: str) -> None:
    model = VQGAN(tiny_config(QUANTIZERS[kind])).eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z_q, indices, qloss, diag = model.encode(x)
    assert z_q.shape == (2, model.config.code_dim, 4, 4) and indices.shape == (2, 4, 4)
    assert qloss.ndim == 0 and "perplexity" in diag
    x_rec = model.decode(z_q)
    assert x_rec.shape == x.shape
    assert torch.allclose(model.decode_indices(indices), x_rec, atol=1e-5)
    assert torch.allclose(model.decode_latents(model.encode_latents(x)), x_rec, atol=1e-5)
    assert model.encode_latents(x).shape == z_q.shape


def test_fsq_projects_to_len_levels_and_back() -> None:
    model = VQGAN(tiny_config(QUANTIZERS["fsq"]))
    assert model.quant_conv.out_channels == 3 and model.post_quant_conv.in_channels == 3
    same = VQGAN(tiny_config({"kind": "vq", "codebook_size": 32}))  # code_dim = z_channels
    assert isinstance(same.quant_conv, torch.nn.Identity)


def test_config_round_trip_rebuilds_the_same_model() -> None:
    model = VQGAN(tiny_config(QUANTIZERS["vq_ema"]))
    clone = VQGAN.from_config(model.config_dict())
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())  # same architecture: keys and shapes agree
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(clone.eval()(x)[0], model.eval()(x)[0])


def _digits(n: int) -> torch.Tensor:
    images = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16.0
    return F.interpolate(images, size=16, mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_tiny_tokenizer_beats_the_mean_image(kind: str) -> None:
    torch.manual_seed(0)
    data = _digits(320)
    train, val = data[:256], data[256:]
    loop = LoopConfig(steps=100, batch_size=16, lr=2e-3, betas=(0.5, 0.9))
    task = TokenizerTask(tiny_config(QUANTIZERS[kind]), loop)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    opt = task.optimizers()["generator"]
    for step in range(loop.steps):
        batch = {"image": train[torch.randint(len(train), (loop.batch_size,))]}
        opt.zero_grad()
        loss, _ = task.step("generator", batch, step=step)
        loss.backward()
        opt.step()
        task.after_update("generator", step=step)
    baseline = F.mse_loss(val, train.mean(0, keepdim=True).expand_as(val)).item()
    mse = F.mse_loss(task.reconstruct(val), val).item()
    assert mse < 0.75 * baseline, (mse, baseline)
    metrics = task.evaluate([{"image": val}])
    assert metrics["codebook_usage"] > 0.2
