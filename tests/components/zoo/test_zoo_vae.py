"""VAE: reparameterised gradients, the bound's parts, a few loop steps, export -> load round trip."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.generators import load_generator
from components.training.config import LoopConfig
from components.zoo.vae import VAE, VAEConfig, VAETask, _sample, export, fit_exported, fit_prior
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


def _fitted(num_classes: int = 3) -> VAE:
    torch.manual_seed(0)
    return VAE(TINY.model_copy(update={"prior": "fitted"}), image_shape=(1, 8, 8), num_classes=num_classes)


def test_fitted_prior_kl_is_the_closed_form_and_samples_draw_from_the_class() -> None:
    vae = _fitted()
    assert vae.prior_mean.shape == (4, 4) and vae.prior_tril.shape == (4, 4, 4)  # 3 classes + "no label"
    b = batch(6)
    x, y = b["image"], b["label"]
    _, kl_before = vae.terms(x, y, torch.zeros(6, 4))
    mu, logvar = vae.encode(x, y)
    normal = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    assert torch.allclose(kl_before, normal, atol=1e-5)  # N(0, I) until fitted: the ELBO trained
    torch.manual_seed(1)
    with torch.no_grad():  # class k: mean 5k, a correlated covariance of its own
        vae.prior_mean.copy_(torch.arange(4.0)[:, None].expand(4, 4) * 5)
        vae.prior_tril.copy_(torch.tril(torch.randn(4, 4, 4), -1) + torch.diag_embed(torch.rand(4, 4) + 0.5))
    _, kl = vae.terms(x, y, torch.zeros(6, 4))
    m, tril = vae.prior(y, 6)
    q = torch.distributions.MultivariateNormal(mu, scale_tril=torch.diag_embed((0.5 * logvar).exp()))
    want = torch.distributions.kl_divergence(q, torch.distributions.MultivariateNormal(m, scale_tril=tril))
    assert torch.allclose(kl, want.detach(), rtol=1e-4, atol=1e-4)

    drawn = {}  # the z the decoder gets, per class: N(5k, T^2 L_k L_k^T)

    def decode(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        drawn[int(y[0])] = z.detach()
        return torch.zeros(z.shape[0], 1, 8, 8)

    vae.decode = decode
    for k in range(3):
        y = torch.full((20000,), k)
        _sample(vae, y, n=20000, generator=torch.Generator().manual_seed(k), temperature=0.5)
        assert torch.allclose(drawn[k].mean(0), torch.full((4,), 5.0 * k), atol=0.1)
        want_cov = 0.25 * vae.prior_tril[k] @ vae.prior_tril[k].T
        assert torch.allclose(torch.cov(drawn[k].T), want_cov, atol=0.05 * float(want_cov.abs().max()))


def test_fit_prior_recovers_each_class_gaussian_and_pools_an_absent_one() -> None:
    vae = _fitted()
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[3.0, 0, 0, 0], [0, -3.0, 0, 0]])
    trils = torch.tril(torch.randn(2, 4, 4, generator=g), -1) * 0.5 + torch.diag_embed(
        torch.rand(2, 4, generator=g) + 0.5
    )
    codes = {k: means[k] + torch.randn(30000, 4, generator=g) @ trils[k].T for k in range(2)}  # class 2: none
    # the encoder's means are the codes: images carry them in their first 4 pixels
    vae.encode = lambda x, y: (x.flatten(1)[:, :4], torch.zeros(x.shape[0], 4))
    data = []
    for k in range(2):
        for chunk in codes[k].split(5000):
            images = torch.zeros(chunk.shape[0], 1, 8, 8)
            images.view(chunk.shape[0], -1)[:, :4] = chunk
            data.append((images, torch.full((chunk.shape[0],), k)))
    assert fit_prior(vae, data, max_images=50000) == 50000  # stops at the cap, mid-batch
    assert fit_prior(vae, data) == 60000
    for k in range(2):
        assert torch.allclose(vae.prior_mean[k], means[k], atol=0.05)
        got = vae.prior_tril[k] @ vae.prior_tril[k].T
        assert torch.allclose(got, trils[k] @ trils[k].T, atol=0.06)
    everything = torch.cat([codes[0], codes[1]])
    for k in (2, 3):  # the absent class and the "no label" row: the fit of all codes
        assert torch.allclose(vae.prior_mean[k], everything.mean(0), atol=1e-3)
        got = vae.prior_tril[k] @ vae.prior_tril[k].T
        assert torch.allclose(got, torch.cov(everything.T), rtol=0.01, atol=0.01)
    with pytest.raises(ValueError, match="at least 2 training images, got 0"):
        fit_prior(_fitted(), [])
    nan = (torch.full((4, 1, 8, 8), float("nan")), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"^fit_prior: the encoder gave non-finite codes \(NaN/inf"):
        fit_prior(_fitted(), [nan])
    with pytest.raises(ValueError, match="prior='normal'; set prior: fitted"):
        fit_prior(VAE(TINY, image_shape=(1, 8, 8), num_classes=3), data)


@pytest.mark.parametrize(
    ("shape", "num_classes", "prior"),
    [
        ((1, 8, 8), 3, "normal"),
        ((3, 8, 8), 0, "normal"),
        ((1, 8, 8), 3, "fitted"),
        ((3, 8, 8), 0, "fitted"),
    ],
)
def test_task_trains_and_round_trips(tmp_path, shape, num_classes, prior) -> None:
    cfg = TINY.model_copy(update={"prior": prior})
    task = VAETask(cfg, LOOP, image_shape=shape, num_classes=num_classes)
    data = batch(8, shape=shape, num_classes=num_classes)
    sink = run_task(task, steps=3, data=data)
    last = sink.rows[-1]
    assert all(math.isfinite(last[k]) for k in ("main/loss", "main/kl_bpd", "val/bpd"))
    assert last["val/bpd"] == pytest.approx(last["val/rec_bpd"] + last["val/kl_bpd"])
    grid = task.sample(5, generator=torch.Generator().manual_seed(0))
    assert grid.shape == (5, *shape)

    trained = task.modules["vae"].state_dict()
    state = fit_exported(
        trained,
        config=cfg,
        image_shape=shape,
        num_classes=num_classes,
        data=lambda: [(data["image"], data["label"])],
    )
    if prior == "fitted":  # N(0, I) until the fit; then the codes' Gaussians, loaded back with the weights
        assert torch.equal(trained["prior_mean"], torch.zeros_like(trained["prior_mean"]))
        assert not torch.equal(state["prior_mean"], trained["prior_mean"])
    else:
        assert state is trained and "prior_mean" not in state
    export(
        tmp_path / "vae",
        state=state,
        config=cfg,
        image_shape=shape,
        num_classes=num_classes,
        temperature=0.8,
    )
    gen = load_generator(tmp_path / "vae")
    assert gen.num_classes == num_classes and gen.image_shape == shape
    if prior == "fitted":
        assert torch.equal(gen.net.prior_tril, state["prior_tril"])
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
    with pytest.raises(ValidationError, match="'normal' or 'fitted'"):
        VAEConfig(prior="gmm")
    with pytest.raises(ValueError, match=r"^vae: image size 12x12 must be a multiple of 8 \(") as err:
        VAETask(VAEConfig(channel_mult=(1, 1, 1)), LOOP, image_shape=(1, 12, 12), num_classes=0)
    assert "\n" not in str(err.value)
    task = VAETask(TINY, LOOP, image_shape=(1, 8, 8), num_classes=3)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2 or be -1 \(unlabelled\), got 0..5"):
        task.step("main", {"image": batch(2)["image"], "label": torch.tensor([0, 5])}, step=0)
