"""DCGAN / WGAN-GP: the penalty's closed form, phase isolation and repeats, export -> load."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from components.generators import load_generator
from components.training.config import LoopConfig
from components.zoo.adversarial import gradient_penalty, r1_penalty
from components.zoo.gan import Discriminator, GANConfig, GANTask, Generator, export
from components.zoo.gan_layers import diff_augment, minibatch_std
from tests.components.zoo.zoo_util import batch, read_config, run_task

torch.set_num_threads(1)

LOOP = LoopConfig(steps=2, batch_size=4, lr=1e-3)


def _cfg(**kw) -> GANConfig:
    return GANConfig(**{"latent_dim": 8, "g_channels": 4, "d_channels": 4, **kw})


def test_gradient_penalty_of_a_linear_critic_matches_the_closed_form() -> None:
    torch.manual_seed(0)
    w = torch.randn(12, requires_grad=True)
    x_hat = torch.randn(5, 3, 2, 2, requires_grad=True)
    scores = x_hat.flatten(1) @ w + 0.3  # C(x) = <w, x> + b: grad_x C = w everywhere
    gp = gradient_penalty(scores, x_hat)
    norm = w.detach().norm()
    torch.testing.assert_close(gp, torch.full((5,), float((norm - 1) ** 2)))
    gp.sum().backward()  # the penalty's own gradient: 2 (||w|| - 1) w / ||w|| per sample
    torch.testing.assert_close(w.grad, 5 * 2 * (norm - 1) * w.detach() / norm)


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm() -> None:
    torch.manual_seed(0)
    w = torch.randn(12, requires_grad=True)
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    r1 = r1_penalty(x.flatten(1) @ w - 0.7, x)  # grad_x D = w for every sample
    torch.testing.assert_close(r1, torch.full((5,), float(w.detach().pow(2).sum())))
    r1.sum().backward()  # d/dw ||w||^2 = 2 w per sample
    torch.testing.assert_close(w.grad, 5 * 2 * w.detach())


def test_minibatch_std_groups_stay_inside_each_part() -> None:
    torch.manual_seed(0)
    real = torch.randn(6, 3, 2, 2)
    collapsed = torch.randn(1, 3, 2, 2).expand(6, 3, 2, 2)  # one sample repeated: no diversity
    out = minibatch_std(torch.cat([real, collapsed]), group=4, parts=2)
    assert out.shape == (12, 1, 2, 2)
    # gcd(6, 4) = 2: groups {0,1}, {2,3}, {4,5} of each part, one value per group over (C, H, W)
    expected = real.view(3, 2, 3, 2, 2).std(dim=1, unbiased=False).mean(dim=(1, 2, 3)).repeat_interleave(2)
    torch.testing.assert_close(out[:6, 0, 0, 0], expected, atol=1e-4, rtol=1e-4)
    assert out[6:].max() < 1e-3 and out[:6].min() > 0.1  # the collapsed half is told apart
    with pytest.raises(ValueError, match=r"batch of 12 does not split into parts=5 equal batches"):
        minibatch_std(torch.cat([real, collapsed]), group=4, parts=5)


def test_minibatch_std_discriminator_sees_diversity() -> None:
    d = Discriminator(_cfg(d_mbstd_group=4), image_shape=(1, 16, 16), num_classes=10)
    assert d.psi.in_features == (2 * 4 + 1) * 4 * 4  # the std map is one more channel into psi
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 2, 3, 4])
    out = d(x, y)
    assert out.shape == (4,)
    altered = x.clone()
    altered[3] += 1.0  # one sample of the group changes: every score in the group moves
    assert not torch.allclose(d(altered, y)[:3], out[:3])
    pair = d(torch.cat([x, altered]), torch.cat([y, y]), parts=2)  # two parts: independent groups
    torch.testing.assert_close(pair[:4], out)


def test_spectral_norm_makes_the_discriminator_blind_to_weight_scale() -> None:
    torch.manual_seed(0)
    d = Discriminator(_cfg(d_spectral_norm=True, d_norm="none"), image_shape=(1, 16, 16), num_classes=0)
    x = torch.randn(8, 1, 16, 16)
    for _ in range(30):  # power iterations (one per training-mode forward)
        d(x, None)
    d.eval()
    layers = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for m in layers:  # W / sigma(W): largest singular value 1 (of the (out, in * k * k) matrix)
        assert float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)) == pytest.approx(
            1.0, rel=1e-2
        )
    before = d(x, None)
    with torch.no_grad():
        for m in layers:
            m.parametrizations.weight.original.mul_(100.0)
    torch.testing.assert_close(d(x, None), before, rtol=1e-4, atol=1e-5)


def test_r1_and_mbstd_train_both_losses() -> None:
    for loss, extra in [("ns", {"r1_weight": 1.0}), ("wgan_gp", {"n_critic": 1})]:
        cfg = _cfg(loss=loss, d_mbstd_group=4, d_spectral_norm=True, **extra)
        task = GANTask(cfg, LOOP, image_shape=(1, 8, 8), num_classes=3)
        task.build(device=torch.device("cpu"), wrap=lambda m: m)
        d_loss, metrics = task.step("discriminator", batch(4), step=0)
        d_loss.backward()
        assert all(p.grad is not None for p in task.modules["discriminator"].parameters() if p.requires_grad)
        if loss == "ns":  # L_D + gamma / 2 * R1
            assert float(d_loss.detach()) == pytest.approx(
                float(metrics["d_loss"] + 0.5 * metrics["r1"]), rel=1e-5
            )
            assert metrics["r1"] > 0
        sink = run_task(task, steps=2, data=batch(16))
        assert math.isfinite(sink.rows[-1]["generator/loss"])


def test_translation_shifts_each_sample_by_at_most_an_eighth() -> None:
    torch.manual_seed(0)
    x = torch.arange(1, 2 * 16 * 16 + 1, dtype=torch.float32).view(1, 2, 16, 16).repeat(64, 1, 1, 1)
    out = diff_augment(x, ["translation"])
    shifts = set()
    for sample in out:
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(sample, torch.roll(x[0], (dy, dx), dims=(1, 2)) * _inside(dy, dx))
        ]
        assert len(found) == 1  # exactly one shift of at most 16 / 8 = 2 pixels, vacated pixels 0
        shifts.add(found[0])
    assert len(shifts) > 5  # drawn per sample


def _inside(dy: int, dx: int, size: int = 16) -> torch.Tensor:
    """The pixels a shift by (dy, dx) fills from the image (the rest are vacated)."""
    ys, xs = torch.arange(size)[:, None], torch.arange(size)[None, :]
    return (((ys - dy) >= 0) & ((ys - dy) < size) & ((xs - dx) >= 0) & ((xs - dx) < size)).float()


def test_cutout_zeroes_one_square_of_half_the_side() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16) + 1.0  # no zero anywhere before
    out = diff_augment(x, ["cutout"])
    cut = out[:, 0] == 0
    assert torch.equal(cut, (out == 0).all(dim=1))  # the same pixels in every channel
    torch.testing.assert_close(out[~cut.unsqueeze(1).expand_as(out)], x[~cut.unsqueeze(1).expand_as(x)])
    for mask in cut:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8  # a square of 8, clipped at the border
        assert int(mask.sum()) == len(rows) * len(cols)  # one rectangle
    assert len({tuple(m.nonzero()[0].tolist()) for m in cut}) > 5


def test_color_is_per_sample_differentiable_and_keeps_grey_grey() -> None:
    torch.manual_seed(0)
    x = (torch.rand(32, 3, 8, 8) * 2 - 1).requires_grad_(True)
    out = diff_augment(x, ["color", "translation", "cutout"])
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # G's gradient flows through the transforms
    grey = torch.rand(16, 1, 8, 8) * 2 - 1
    shifted = diff_augment(grey, ["color"]) - grey
    assert shifted.std(dim=(1, 2, 3)).max() > 0 and len(set(shifted[:, 0, 0, 0].tolist())) == 16
    assert diff_augment(grey, []) is grey
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['flip'\]"):
        diff_augment(grey, ["flip"])


@pytest.mark.parametrize("loss", ["ns", "wgan_gp"])
def test_d_augment_reaches_every_discriminator_input(loss) -> None:
    torch.manual_seed(0)
    cfg = _cfg(loss=loss, d_augment=["translation", "cutout"], r1_weight=1.0 if loss == "ns" else 0.0)
    task = GANTask(cfg, LOOP, image_shape=(1, 16, 16), num_classes=3)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    seen = []
    task.modules["discriminator"].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    data = batch(8, shape=(1, 16, 16))
    d_loss, _ = task.step("discriminator", data, step=0)
    d_loss.backward()
    reals = seen[0][:8]
    assert not torch.equal(reals, data["image"])  # D never sees an image un-augmented
    assert (reals == 0).flatten(1).sum(1).min() > 0  # every real lost a cutout square
    task.step("generator", data, step=0)
    assert (seen[-1] == 0).flatten(1).sum(1).min() > 0  # ... nor the generator's fakes
    with pytest.raises(ValidationError, match="d_augment"):
        _cfg(d_augment=["flip"])


def test_mode_seeking_pairs_share_a_class_and_punish_ignoring_z() -> None:
    task = GANTask(_cfg(mode_seeking=2.0), LOOP, image_shape=(1, 8, 8), num_classes=3)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    seen = []
    task.modules["generator"].register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    loss, metrics = task.step("generator", batch(7), step=0)  # pairs (0, 3), (1, 4), (2, 5); 6 alone
    torch.testing.assert_close(seen[0][:3], seen[0][3:6])
    assert float(loss.detach()) == pytest.approx(
        float(metrics["g_loss"] + 2.0 / (metrics["ms_ratio"] + 1e-5))
    )
    loss.backward()
    assert task.modules["generator"].project.weight.grad is not None
    with torch.no_grad():  # a generator blind to z: every pair is identical, the ratio 0
        task.modules["generator"].project.weight[:, :8] = 0
    loss, metrics = task.step("generator", batch(7), step=0)
    assert float(metrics["ms_ratio"]) < 1e-6 and float(loss.detach()) > 1e4
    plain = GANTask(_cfg(), LOOP, image_shape=(1, 8, 8), num_classes=3)
    plain.build(device=torch.device("cpu"), wrap=lambda m: m)
    assert "ms_ratio" not in plain.step("generator", batch(7), step=0)[1]  # off by default


def test_generator_shapes_and_projection_for_unlabelled() -> None:
    for shape in [(1, 16, 16), (3, 32, 32), (1, 28, 28)]:
        g = Generator(_cfg(), image_shape=shape, num_classes=10)
        x = g(torch.randn(2, 8), torch.tensor([0, 9]))
        assert x.shape == (2, *shape) and x.abs().max() <= 1
    d = Discriminator(_cfg(), image_shape=(1, 16, 16), num_classes=10)
    x = torch.randn(2, 1, 16, 16)
    unlabelled = d(x, torch.tensor([-1, -1]))
    torch.testing.assert_close(unlabelled, d.psi(d.features(x).flatten(1)).squeeze(1))  # no projection
    assert not torch.allclose(d(x, torch.tensor([3, 3])), unlabelled)


def test_generator_phase_leaves_no_gradient_in_the_discriminator() -> None:
    task = GANTask(_cfg(), LOOP, image_shape=(1, 8, 8), num_classes=3)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    loss, _ = task.step("generator", batch(4), step=0)
    loss.backward()
    assert all(p.grad is None for p in task.modules["discriminator"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.modules["generator"].parameters())
    task.modules["generator"].zero_grad(set_to_none=True)
    loss, _ = task.step("discriminator", batch(4), step=0)
    loss.backward()  # the fakes are made under no_grad
    assert all(p.grad is None for p in task.modules["generator"].parameters())


@pytest.mark.parametrize(("loss", "repeats", "family"), [("ns", 1, "gan"), ("wgan_gp", 3, "wgan")])
def test_both_phases_step_and_the_export_round_trips(tmp_path, loss, repeats, family) -> None:
    cfg = _cfg(loss=loss, n_critic=repeats if loss == "wgan_gp" else None)
    task = GANTask(cfg, LOOP, image_shape=(1, 8, 8), num_classes=3)
    assert [(p.name, p.repeats) for p in task.phases] == [("discriminator", repeats), ("generator", 1)]
    calls: list[str] = []
    real_step = task.step

    def counting_step(phase, b, *, step):
        calls.append(phase)
        return real_step(phase, b, step=step)

    task.step = counting_step
    sink = run_task(task, steps=3, data=batch(16))
    assert calls == (["discriminator"] * repeats + ["generator"]) * 3
    last = sink.rows[-1]
    keys = ["discriminator/loss", "generator/loss", "val/g_loss"]
    keys += ["discriminator/wasserstein", "val/wasserstein"] if loss == "wgan_gp" else ["val/d_loss"]
    assert all(math.isfinite(last[k]) for k in keys)
    if loss == "wgan_gp":  # the critic loss is -W + lambda GP
        assert last["discriminator/loss"] == pytest.approx(
            -last["discriminator/wasserstein"] + 10 * last["discriminator/gp"], rel=1e-4, abs=1e-5
        )

    export(
        tmp_path / family,
        state=task.modules["generator"].state_dict(),
        config=cfg,
        image_shape=(1, 8, 8),
        num_classes=3,
    )
    assert read_config(tmp_path / family)["family"] == family
    gen = load_generator(tmp_path / family)
    assert (
        gen.num_classes == 3 and gen.image_shape == (1, 8, 8) and gen.default_options == {"truncation": None}
    )
    labels = torch.tensor([0, 1, 2, 2])
    a = gen.sample(labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, gen.sample(labels, generator=torch.Generator().manual_seed(3)))
    assert a.shape == (4, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    truncated = gen.sample(labels, generator=torch.Generator().manual_seed(3), truncation=0.5)
    assert not torch.equal(a, truncated)
    with pytest.raises(ValueError, match=r"truncation=0: must be null or a finite number in \(0, 10\]"):
        gen.sample(labels, generator=torch.Generator(), truncation=0)
    assert gen.sample(4, generator=torch.Generator()).shape == (4, 1, 8, 8)  # n: classes drawn uniformly
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        gen.sample(torch.tensor([3]), generator=torch.Generator())


def test_unconditional_and_rgb() -> None:
    task = GANTask(_cfg(loss="wgan_gp", n_critic=2), LOOP, image_shape=(3, 16, 16), num_classes=0)
    sink = run_task(task, steps=2, data=batch(8, shape=(3, 16, 16), num_classes=0))
    assert math.isfinite(sink.rows[-1]["generator/loss"])
    assert task.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 3, 16, 16)


def test_bad_configs_are_one_line() -> None:
    with pytest.raises(ValidationError, match="'ns' or 'wgan_gp'"):
        GANConfig(loss="hinge")
    with pytest.raises(ValidationError, match="'layer' or 'none'"):
        GANConfig(d_norm="batch")
    with pytest.raises(ValidationError, match="extra"):
        GANConfig(ncritic=5)
    with pytest.raises(ValidationError, match=r"r1_weight is not read by wgan_gp: its gradient penalty"):
        GANConfig(loss="wgan_gp", r1_weight=1.0)  # else silently ignored
    with pytest.raises(ValueError, match=r"^wgan: image size 6x6 must be even and at least 8$"):
        GANTask(GANConfig(loss="wgan_gp"), LOOP, image_shape=(1, 6, 6), num_classes=0)
    assert GANConfig(loss="wgan_gp").adam_betas == (0.0, 0.9) and GANConfig().adam_betas == (0.5, 0.999)
    assert GANConfig(loss="wgan_gp").critic_repeats == 5 and GANConfig().critic_repeats == 1
