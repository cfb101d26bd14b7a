"""MaskGIT prior: training masks, decoding fills every position in `steps` steps, never re-masks."""

from __future__ import annotations

import math

import pytest
import torch

from components.prior.config import MaskGITConfig
from components.prior.maskgit import MaskGIT, generate, masked_loss, num_masked, random_mask

K, CLASSES = 9, 3
GAMMA = {
    "cosine": lambda r: math.cos(math.pi / 2 * r),
    "linear": lambda r: 1 - r,
    "square": lambda r: 1 - r * r,
}


def tiny_maskgit(*, num_tokens: int = 16, schedule: str = "cosine", num_classes: int = CLASSES) -> MaskGIT:
    torch.manual_seed(0)
    cfg = MaskGITConfig(layers=2, heads=2, width=32, dropout=0.0, mask_schedule=schedule)
    return MaskGIT(cfg, num_tokens=num_tokens, codebook_size=K, num_classes=num_classes).eval()


def test_attention_is_bidirectional() -> None:
    model = tiny_maskgit()
    tokens = torch.full((1, 16), model.mask_id)
    changed = tokens.clone()
    changed[0, 15] = 3
    a, b = model(tokens, torch.tensor([0])), model(changed, torch.tensor([0]))
    assert a.shape == (1, 16, K)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first position sees the last one


@pytest.mark.parametrize("schedule", sorted(GAMMA))
@pytest.mark.parametrize(("num_tokens", "steps"), [(16, 8), (16, 1), (16, 3), (4, 8), (64, 12)])
def test_decoding_follows_the_schedule_and_never_remasks(schedule: str, num_tokens: int, steps: int) -> None:
    model = tiny_maskgit(num_tokens=num_tokens, schedule=schedule)
    tokens, history = generate(
        model,
        torch.tensor([0, 1, 2]),
        generator=torch.Generator().manual_seed(0),
        steps=steps,
        return_history=True,
    )
    assert history.shape == (steps, 3, num_tokens)
    assert torch.equal(history[-1], tokens)
    assert tokens.min() >= 0 and tokens.max() < K  # every position filled after exactly `steps` steps
    masked = history == model.mask_id
    expected = [math.floor(num_tokens * GAMMA[schedule](t / steps) + 1e-9) for t in range(1, steps + 1)]
    expected[-1] = 0
    for t in range(steps):
        assert masked[t].sum(-1).tolist() == [expected[t]] * 3, f"step {t + 1}"
        assert num_masked(t + 1, steps=steps, num_tokens=num_tokens, schedule=schedule) == expected[t]
    before = torch.ones_like(masked[0])  # fully masked at t = 0
    grid = torch.full_like(tokens, model.mask_id)
    for t in range(steps):
        assert not (masked[t] & ~before).any(), f"a kept token was re-masked at step {t + 1}"
        kept = ~before
        assert torch.equal(history[t][kept], grid[kept]), f"a kept token changed at step {t + 1}"
        before, grid = masked[t], history[t]


def test_guidance_one_is_conditional_and_zero_is_unconditional() -> None:
    model = tiny_maskgit()
    with torch.no_grad():  # classes far apart, so that guidance visibly changes samples
        model.net.cls_emb.weight.normal_(std=1.0)
        model.net.head.weight.normal_(std=0.5)
    labels = torch.tensor([0, 1, 2, 1])

    def draw(labels, **options):
        return generate(model, labels, generator=torch.Generator().manual_seed(4), steps=4, **options)

    conditional = draw(labels)
    assert torch.equal(draw(labels, guidance=1.0 + 1e-6), conditional)  # the guided 2B path with w ~ 1
    assert torch.equal(draw(labels, guidance=0.0), draw(len(labels)))
    assert not torch.equal(draw(labels, guidance=6.0), conditional)


def test_randomness_only_from_the_injected_generator() -> None:
    model = tiny_maskgit()
    state = torch.get_rng_state()
    a = generate(model, 3, generator=torch.Generator().manual_seed(1), top_k=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, generate(model, 3, generator=torch.Generator().manual_seed(1), top_k=4))
    assert not torch.equal(a, generate(model, 3, generator=torch.Generator().manual_seed(2), top_k=4))


@pytest.mark.parametrize("schedule", sorted(GAMMA))
def test_training_mask_counts_follow_the_schedule(schedule: str) -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(4000, 16, dtype=torch.long)
    mask = random_mask(tokens, schedule=schedule, generator=g)
    counts = mask.sum(-1)
    assert counts.min() >= 1 and counts.max() <= 16
    # E[ceil(16 gamma(r))], r ~ U[0, 1): between 16 E[gamma] and 16 E[gamma] + 1
    mean_gamma = {"cosine": 2 / math.pi, "linear": 0.5, "square": 2 / 3}[schedule]
    assert 16 * mean_gamma - 0.2 < counts.float().mean() < 16 * mean_gamma + 1.2
    # the same generator seed gives the same mask, and positions are uniform
    assert torch.equal(
        mask, random_mask(tokens, schedule=schedule, generator=torch.Generator().manual_seed(0))
    )
    share = mask.float().mean(0)
    assert (share - share.mean()).abs().max() < 0.05


def test_masked_loss_scores_masked_positions_only() -> None:
    logits = torch.randn(2, 5, K)
    tokens = torch.randint(0, K, (2, 5))
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    loss, _ = masked_loss(logits, tokens, mask)
    wild = logits.clone()
    wild[~mask] = 100 * torch.randn_like(wild[~mask])  # unmasked positions must not matter
    assert torch.equal(masked_loss(wild, tokens, mask)[0], loss)
    ce = torch.nn.functional.cross_entropy(logits[mask], tokens[mask])
    torch.testing.assert_close(loss, ce)


def test_bad_steps_is_an_error() -> None:
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        generate(tiny_maskgit(), 2, generator=torch.Generator(), steps=0)
