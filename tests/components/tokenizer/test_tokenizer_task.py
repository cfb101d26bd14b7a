"""TokenizerTask: phases, the adversarial term from disc.start_step, gradient isolation, evaluation."""

from __future__ import annotations

import pytest
import torch

from components.nn.discriminator import PatchDiscriminator
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.task import TokenizerTask
from components.training.config import LoopConfig
from components.training.task import Phase

torch.set_num_threads(1)

LOOP = LoopConfig(steps=10, batch_size=4, lr=1e-3, betas=(0.5, 0.9))


class _Features(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(x)]


def _task(
    *, quantizer: dict | None = None, perceptual: bool = True, build: bool = True, **disc
) -> TokenizerTask:
    cfg = TokenizerConfig(
        autoencoder=dict(
            in_channels=1,
            channels=8,
            channel_mult=(1, 2, 2),
            downsample_factor=4,
            num_res_blocks=1,
            z_channels=8,
        ),
        quantizer=quantizer or {"kind": "vq", "codebook_size": 16, "ema": True},
        loss={
            "perceptual_weight": 1.0 if perceptual else 0.0,
            "disc": {"layers": 2, "channels": 8, "start_step": 3, **disc},
        },
    )
    task = TokenizerTask(cfg, LOOP, feature_fn=_Features().feature_maps if perceptual else None)
    if build:
        task.build(device=torch.device("cpu"), wrap=lambda m: m)
    return task


def _batch() -> dict[str, torch.Tensor]:
    return {"image": torch.rand(4, 1, 16, 16) * 2 - 1, "label": torch.zeros(4, dtype=torch.long)}


def test_phases_modules_and_optimizers() -> None:
    task = _task()
    assert task.phases == (
        Phase("generator", "generator"),
        Phase("discriminator", "discriminator", start_step=3),
    )
    assert set(task.modules) == {"vqgan", "discriminator"} == set(task.wrapped)
    opts = task.optimizers()
    assert set(opts) == {"generator", "discriminator"}
    assert opts["generator"].defaults["betas"] == (0.5, 0.9)
    no_disc = _task(weight=0.0)
    assert [p.name for p in no_disc.phases] == ["generator"] and "discriminator" not in no_disc.modules


def test_adversarial_term_only_from_the_start_step() -> None:
    task = _task()
    _, before = task.step("generator", _batch(), step=2)
    assert "g_loss" not in before
    _, after = task.step("generator", _batch(), step=3)
    assert {"g_loss", "d_weight", "rec_loss", "p_loss", "q_loss", "perplexity"} <= set(after)
    assert after["d_weight"] >= 0


def test_phases_leave_no_gradients_in_the_other_network() -> None:
    task = _task()
    vqgan, disc = task.modules["vqgan"], task.modules["discriminator"]
    loss, _ = task.step("generator", _batch(), step=5)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert vqgan.decoder.last_layer.grad is not None
    vqgan.zero_grad(set_to_none=True)
    codebook = vqgan.quantizer.codebook.clone()
    d_loss, diag = task.step("discriminator", _batch(), step=5)
    d_loss.backward()
    assert all(p.grad is None for p in vqgan.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    assert {"d_loss", "logits_real", "logits_fake"} <= set(diag)
    task.after_update("discriminator", step=5)
    assert torch.equal(vqgan.quantizer.codebook, codebook), (
        "the discriminator phase must not move the codebook"
    )


def test_after_generator_update_moves_the_ema_codebook() -> None:
    task = _task()
    codebook = task.modules["vqgan"].quantizer.codebook.clone()
    task.step("generator", _batch(), step=0)
    task.after_update("generator", step=0)
    assert not torch.equal(task.modules["vqgan"].quantizer.codebook, codebook)


def test_gumbel_temperature_follows_the_step() -> None:
    task = _task(
        quantizer={
            "kind": "gumbel",
            "codebook_size": 16,
            "tau_start": 1.0,
            "tau_end": 0.25,
            "anneal_steps": 10,
        }
    )
    task.step("generator", _batch(), step=10)
    assert task.modules["vqgan"].quantizer.tau == pytest.approx(0.25)
    task.step("generator", _batch(), step=5)
    assert task.modules["vqgan"].quantizer.tau == pytest.approx(0.5)


def test_evaluate_reconstruct_and_sample() -> None:
    task = _task(perceptual=False)
    metrics = task.evaluate([_batch(), _batch()])
    assert set(metrics) == {"l1", "psnr", "codebook_usage", "perplexity"}
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
    assert metrics["psnr"] > 0 and metrics["l1"] > 0
    assert task.modules["vqgan"].training, "evaluate must restore training mode"
    x_rec = task.reconstruct(_batch()["image"])
    assert x_rec.shape == (4, 1, 16, 16) and x_rec.abs().max() <= 1
    assert task.sample(4, generator=torch.Generator()) is None


def test_perceptual_weight_needs_a_feature_network() -> None:
    cfg = TokenizerConfig(autoencoder=dict(in_channels=1, channel_mult=(1, 2), downsample_factor=2))
    with pytest.raises(ValueError, match="perceptual_weight=1.0 needs a feature network"):
        TokenizerTask(cfg, LOOP)


def test_unknown_phase() -> None:
    with pytest.raises(ValueError, match=r"unknown phase 'critic'; valid: \['generator', 'discriminator'\]"):
        _task().step("critic", _batch(), step=0)


def test_runs_under_the_training_loop_with_accumulation() -> None:
    from components.training.loop import train

    task = _task(perceptual=False, build=False, start_step=2)
    loop = LoopConfig(
        steps=5, batch_size=4, grad_accum=2, lr=1e-3, betas=(0.5, 0.9), log_every=1, val_every=5
    )
    data = [_batch() for _ in range(4)]
    metrics = train(
        task,
        loop=loop,
        batches=lambda epoch: data,
        device=torch.device("cpu"),
        val_batches=lambda: data[:2],
        progress=False,
    )
    assert {"generator/g_loss", "discriminator/d_loss", "val/codebook_usage", "val/psnr"} <= set(metrics)
    assert task.modules["vqgan"].quantizer.cluster_size.sum() != 16, "the EMA codebook must have been updated"


def _disc_update(task: TokenizerTask, opt: torch.optim.Optimizer, batch, *, step: int) -> dict:
    """One discriminator update as the loop does it: loss, backward, clip, step."""
    opt.zero_grad(set_to_none=True)
    loss, diag = task.step("discriminator", batch, step=step)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(task.modules["discriminator"].parameters(), 1.0)
    opt.step()
    return diag


def test_discriminator_step_moves_only_the_discriminator() -> None:
    task = _task(perceptual=False, start_step=0)
    opt = task.optimizers()["discriminator"]
    disc = {k: v.clone() for k, v in task.modules["discriminator"].state_dict().items()}
    vqgan = {k: v.clone() for k, v in task.modules["vqgan"].state_dict().items()}
    diag = _disc_update(task, opt, _batch(), step=0)
    assert {"d_acc_real", "d_acc_fake"} <= set(diag) and all(
        0 <= diag[k] <= 1 for k in ("d_acc_real", "d_acc_fake")
    )
    after = task.modules["discriminator"].state_dict()
    # The output bias is exempt: while every logit is inside the hinge margin its gradient is
    # (fakes in margin - reals in margin) / 2N = 0, so Adam leaves it where it is.
    out_bias = f"net.{len(task.modules['discriminator'].net) - 1}.bias"
    expected = [k for k in disc if k != out_bias]
    moved = [k for k in disc if not torch.equal(disc[k], after[k])]
    assert set(expected) <= set(moved), (
        f"left unchanged by the discriminator step: {set(expected) - set(moved)}"
    )
    assert all(torch.equal(v, task.modules["vqgan"].state_dict()[k]) for k, v in vqgan.items())


def test_discriminator_separates_real_from_reconstructed() -> None:
    """Against an untrained VQGAN's reconstructions (clearly fake) the PatchGAN learns within a few dozen steps."""
    torch.manual_seed(0)
    task = _task(perceptual=False, start_step=0)
    opt = task.optimizers()["discriminator"]
    data = [_digit_like_batch(8, seed=i) for i in range(4)]
    for step in range(40):
        diag = _disc_update(task, opt, data[step % 4], step=step)
    assert diag["d_acc_real"] > 0.9 and diag["d_acc_fake"] > 0.9, diag
    assert diag["d_loss"] < 0.5, diag


def _digit_like_batch(n: int, *, seed: int) -> dict[str, torch.Tensor]:
    """Bright strokes on a -1 background, like the prepared digits: (n, 1, 16, 16) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 16, 16), -1.0)
    for i in range(n):
        r, c = torch.randint(3, 8, (2,), generator=g).tolist()
        x[i, 0, r : r + 8, c : c + 2] = 1.0  # a vertical bar
        x[i, 0, r : r + 2, c : c + 6] = 1.0  # and a horizontal one
    return {"image": x, "label": torch.zeros(n, dtype=torch.long)}


@pytest.mark.parametrize("norm", ["none", "group"])
@torch.no_grad()
def test_an_input_independent_activation_cannot_blind_the_discriminator(norm: str) -> None:
    """The failure of the GroupNorm PatchGAN: a large pattern shared by all images in a hidden layer.

    GroupNorm divides each sample by its group's spread, shared pattern included, so growing that
    pattern shrinks how much the logits depend on the image (the default run's discriminator went
    from 0.27 to 0.004 logit std over images and stopped learning). Without a normalisation the
    pattern only shifts pre-activations: a leaky ReLU keeps at least its 0.2 slope.
    """
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=1, channels=8, n_layers=2, norm=norm)
    x = _digit_like_batch(16, seed=0)["image"]
    spread = disc(x).std(dim=0).mean()  # how much the logits depend on the image
    hidden = disc.net[2]  # the first hidden conv (before its norm, if any)
    pattern = torch.randn(1, hidden.out_channels, 4, 4)
    handle = hidden.register_forward_hook(lambda m, i, out: out + 1e3 * out.std() * pattern)
    blinded = disc(x).std(dim=0).mean()
    handle.remove()
    ratio = float(blinded / spread)
    if norm == "none":
        assert ratio > 0.05, f"the logits' dependence on the image fell {1 / ratio:.0f}x"
    else:  # documents why "group" is not the default
        assert ratio < 0.01
