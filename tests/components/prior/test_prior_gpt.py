"""GPT prior: causality, KV cache parity, guidance limits, randomness only from the injected generator."""

from __future__ import annotations

import pytest
import torch

from components.prior.config import GPTConfig
from components.prior.gpt import GPT, generate
from components.prior.transformer import KVCache

K, N, CLASSES = 11, 12, 3


def tiny_gpt(num_classes: int = CLASSES, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(layers=2, heads=2, width=32), num_tokens=N, codebook_size=K, num_classes=num_classes
    ).eval()


@pytest.mark.parametrize("j", [0, 5, N - 2])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(j: int) -> None:
    model = tiny_gpt()
    tokens = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % K
    classes = torch.tensor([0, 2])
    a, b = model(tokens, classes), model(changed, classes)
    assert a.shape == (2, N, K)
    # logits at position i predict token i from tokens < i: positions <= j cannot see token j
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, j + 1], b[:, j + 1])  # ... and position j + 1 does


def test_cached_logits_equal_the_full_forward() -> None:
    model = tiny_gpt()
    tokens = torch.randint(0, K, (3, N), generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 1, 3])  # 3: the null class
    full = model(tokens, classes)
    cache = KVCache(max_len=N)
    steps = [model.net.run(tokens[:, :0], classes, causal=True, cache=cache)]
    steps += [model.net.run(tokens[:, i - 1 : i], None, causal=True, cache=cache) for i in range(1, N)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 4}, {"top_p": 0.8, "temperature": 0.7}, {"guidance": 3.0}, {"guidance": 2.0, "top_k": 3}],
)
def test_kv_cache_sampling_equals_uncached_token_for_token(options: dict) -> None:
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = [
        generate(model, labels, generator=torch.Generator().manual_seed(7), use_cache=use_cache, **options)
        for use_cache in (True, False)
    ]
    assert out[0].shape == (5, N) and out[0].dtype == torch.int64
    assert out[0].min() >= 0 and out[0].max() < K
    assert torch.equal(out[0], out[1])


def test_guidance_one_is_conditional_and_zero_is_unconditional() -> None:
    model = tiny_gpt()
    with torch.no_grad():  # classes far apart, so that guidance visibly changes samples
        model.net.cls_emb.weight.normal_(std=1.0)
        model.net.head.weight.normal_(std=0.5)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])

    def draw(labels, **options):
        return generate(model, labels, generator=torch.Generator().manual_seed(3), **options)

    conditional = draw(labels)
    # w = 1 + 1e-6 runs the 2B guided path: l_u + w (l_c - l_u) must reproduce the conditional samples
    assert torch.equal(draw(labels, guidance=1.0 + 1e-6), conditional)
    assert torch.equal(draw(labels, guidance=0.0), draw(len(labels)))  # w = 0: the null class alone
    assert not torch.equal(draw(labels, guidance=5.0), conditional)  # guidance does change samples


def test_top_k_one_is_greedy_and_samples_respect_top_k() -> None:
    model = tiny_gpt()
    labels = torch.tensor([0, 1])
    greedy = generate(model, labels, generator=torch.Generator().manual_seed(0), top_k=1)
    other = generate(model, labels, generator=torch.Generator().manual_seed(99), top_k=1)
    assert torch.equal(greedy, other)  # no randomness left
    logits = model(greedy, labels)
    assert torch.equal(logits.argmax(-1), greedy)  # each token is the argmax given its prefix


def test_randomness_only_from_the_injected_generator() -> None:
    model = tiny_gpt()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(5), top_p=0.9)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    b = generate(model, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(5), top_p=0.9)
    assert torch.equal(a, b)
    assert model.training is False


def test_unconditional_model_and_label_errors() -> None:
    model = tiny_gpt(num_classes=0)
    assert generate(model, 3, generator=torch.Generator().manual_seed(0)).shape == (3, N)
    with pytest.raises(ValueError, match="guidance=2.0 needs a class-conditional model"):
        generate(model, 3, generator=torch.Generator(), guidance=2.0)
    with pytest.raises(ValueError, match=r"labels must be a 1-D tensor of classes in \[0, 3\)"):
        generate(tiny_gpt(), torch.tensor([3]), generator=torch.Generator())
