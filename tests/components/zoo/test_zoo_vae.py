"""VAE: reparameterised gradients, the bound's parts, a few loop steps, export -> load round trip."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.generators import load_generator
from components.training.config import LoopConfig
from components.zoo.vae import VAE, VAEConfig, VAETask, export
from tests.components.zoo.zoo_util import batch, run_task

torch.set_num_threads(1)

TINY = VAEConfig(channels=8, channel_mult=(1, 2), latent_dim=4)
LOOP = LoopConfig(steps=2, batch_size=4, lr=1e-3)


def test_gradients_flow_through_the_reparameterisation() -> None:
    torch.manual_seed(0)
    vae = VAE(TINY, image_shape=(1, 8, 8), num_classes=3)
    b = batch(4)
    rec, kl = vae.terms(b["image"], b["label"], torch.randn(4, 4))
    rec.sum().backward()  # the reconstruction reaches the encoder only through z = mu + sigma * eps
    grad = vae.enc_out.weight.grad
    mu_rows, logvar_rows = grad.chunk(2, dim=0)
    assert mu_rows.abs().sum() > 0 and logvar_rows.abs().sum() > 0
    assert vae.log_scale.grad.abs().sum() > 0
    assert kl.shape == (4,) and bool((kl >= 0).all())


def test_kl_is_zero_at_the_prior_and_rec_is_a_discrete_nll() -> None:
    vae = VAE(TINY, image_shape=(1, 8, 8), num_classes=0)
    for p in vae.enc_out.parameters():
        torch.nn.init.zeros_(p)  # q(z|x) = N(0, I)
    rec, kl = vae.terms(batch(2, num_classes=0)["image"], None, torch.zeros(2, 4))
    assert torch.allclose(kl, torch.zeros(2))
    assert bool((rec > 0).all())  # -log of probabilities of 8-bit bins


@pytest.mark.parametrize(("shape", "num_classes"), [((1, 8, 8), 3), ((3, 8, 8), 0)])
def test_task_trains_and_round_trips(tmp_path, shape, num_classes) -> None:
    task = VAETask(TINY, LOOP, image_shape=shape, num_classes=num_classes)
    sink = run_task(task, steps=3, data=batch(8, shape=shape, num_classes=num_classes))
    last = sink.rows[-1]
    assert all(math.isfinite(last[k]) for k in ("main/loss", "main/kl_bpd", "val/bpd"))
    assert last["val/bpd"] == pytest.approx(last["val/rec_bpd"] + last["val/kl_bpd"])
    grid = task.sample(5, generator=torch.Generator().manual_seed(0))
    assert grid.shape == (5, *shape)

    export(
        tmp_path / "vae",
        state=task.modules["vae"].state_dict(),
        config=TINY,
        image_shape=shape,
        num_classes=num_classes,
        temperature=0.8,
    )
    gen = load_generator(tmp_path / "vae")
    assert gen.num_classes == num_classes and gen.image_shape == shape
    assert gen.default_options == {"temperature": 0.8}
    labels = torch.tensor([0, 2, 1]) if num_classes else 3
    a = gen.sample(labels, generator=torch.Generator().manual_seed(1))
    b = gen.sample(labels, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, *shape) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    bpd = gen.bits_per_dim(batch(2, shape=shape)["image"], generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (2,) and bool(torch.isfinite(bpd).all()) and bool((bpd > 0).all())
    with pytest.raises(ValueError, match="unknown sampling option 'steps'; valid: temperature"):
        gen.sample(labels, generator=torch.Generator(), steps=3)
    with pytest.raises(ValueError, match="temperature=-1"):
        gen.sample(labels, generator=torch.Generator(), temperature=-1)


def test_bad_configs_are_one_line() -> None:
    with pytest.raises(ValidationError, match="extra"):
        VAEConfig(latent_dims=3)
    with pytest.raises(ValidationError, match="greater than 0"):
        VAEConfig(beta=0)
    with pytest.raises(ValueError, match=r"^vae: image size 12x12 must be a multiple of 8 \(") as err:
        VAETask(VAEConfig(channel_mult=(1, 1, 1)), LOOP, image_shape=(1, 12, 12), num_classes=0)
    assert "\n" not in str(err.value)
    task = VAETask(TINY, LOOP, image_shape=(1, 8, 8), num_classes=3)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2 or be -1 \(unlabelled\), got 0..5"):
        task.step("main", {"image": batch(2)["image"], "label": torch.tensor([0, 5])}, step=0)
