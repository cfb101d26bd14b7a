"""PriorTask: trains on a learnable token distribution in a plain process; optimizer groups; labels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.prior.task import PriorTask, param_groups
from components.training.config import LoopConfig
from components.training.loop import train

CPU = torch.device("cpu")
GRID, K, CLASSES = (3, 3), 8, 4


def _loop(**kw) -> LoopConfig:
    base = dict(steps=80, batch_size=32, lr=3e-3, weight_decay=0.01, schedule="constant", log_every=20)
    return LoopConfig(**{**base, **kw})


@pytest.mark.parametrize(("kind", "num_classes"), [("gpt", CLASSES), ("maskgit", CLASSES), ("gpt", 0)])
def test_loss_goes_down_on_a_learnable_distribution(helpers, kind: str, num_classes: int) -> None:
    data = helpers.chain_tokens(256, grid=GRID, codebook_size=K, num_classes=num_classes)
    val = helpers.chain_tokens(64, grid=GRID, codebook_size=K, num_classes=num_classes, seed=1)
    loop = _loop()
    task = PriorTask(
        helpers.tiny_prior(kind, label_dropout=0.1), loop, grid=GRID, codebook_size=K, num_classes=num_classes
    )
    val_batches = helpers.batches_of(val, batch_size=32)
    fresh = PriorTask(helpers.tiny_prior(kind), loop, grid=GRID, codebook_size=K, num_classes=num_classes)
    fresh.build(device=CPU, wrap=lambda m: m)
    before = fresh.evaluate(val_batches(0))
    assert before["loss"] == pytest.approx(math.log(K), abs=0.1)  # an untrained prior is near uniform
    final = train(
        task,
        loop=loop,
        batches=helpers.batches_of(data, batch_size=32),
        device=CPU,
        val_batches=lambda: val_batches(0),
        progress=False,
    )
    # chain: every token but an unconditional t_0 is determined by its neighbours and the label
    assert final["val/loss"] < 0.5 * before["loss"]
    assert final["val/accuracy"] > 0.6
    assert final["main/loss"] < before["loss"]


def test_optimizer_groups_decay_linear_weights_only(helpers) -> None:
    task = PriorTask(helpers.tiny_prior("gpt"), _loop(), grid=GRID, codebook_size=K, num_classes=CLASSES)
    task.build(device=CPU, wrap=lambda m: m)
    model = task.modules["prior"]
    decay, no_decay = param_groups(model, weight_decay=0.1)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear and decay["weight_decay"] == 0.1
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"net.tok_emb.weight", "net.cls_emb.weight", "net.pos_emb", "net.ln_f.weight"} <= no_decay_names
    (opt,) = task.optimizers().values()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[1]["weight_decay"] == 0.0


def test_label_dropout_unlabelled_and_bad_labels(helpers) -> None:
    task = PriorTask(helpers.tiny_prior("gpt"), _loop(), grid=GRID, codebook_size=K, num_classes=CLASSES)
    labels = torch.tensor([0, 3, -1, 2])
    assert task._classes(labels, drop=0.0).tolist() == [0, 3, CLASSES, 2]  # -1: the null class
    assert task._classes(labels, drop=1.0 - 1e-9).tolist() == [CLASSES] * 4
    torch.manual_seed(0)
    dropped = task._classes(torch.zeros(4000, dtype=torch.long), drop=0.25)
    assert abs((dropped == CLASSES).float().mean().item() - 0.25) < 0.03
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) or be -1"):
        task._classes(torch.tensor([4]), drop=0.0)
    uncond = PriorTask(helpers.tiny_prior("gpt"), _loop(), grid=GRID, codebook_size=K, num_classes=0)
    assert uncond._classes(labels, drop=0.0).tolist() == [0] * 4


def test_tokens_are_checked_against_grid_and_codebook(helpers) -> None:
    task = PriorTask(helpers.tiny_prior("maskgit"), _loop(), grid=GRID, codebook_size=K, num_classes=0)
    task.build(device=CPU, wrap=lambda m: m)
    batch = helpers.chain_tokens(4, grid=(4, 4), codebook_size=K, num_classes=0)
    with pytest.raises(ValueError, match=r"tokens have grid \(4, 4\), the prior was built for \(3, 3\)"):
        task.step("main", batch, step=0)
    batch = helpers.chain_tokens(4, grid=GRID, codebook_size=K + 1, num_classes=0)
    batch["tokens"][0, 0, 0] = K
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 8\)"):
        task.step("main", batch, step=0)
    with pytest.raises(ValueError, match="grid=\\(0, 3\\) must be"):
        PriorTask(helpers.tiny_prior("gpt"), _loop(), grid=(0, 3), codebook_size=K, num_classes=0)
    assert task.sample(2, generator=torch.Generator()) is None


def test_maskgit_evaluate_is_deterministic(helpers) -> None:
    task = PriorTask(helpers.tiny_prior("maskgit"), _loop(), grid=GRID, codebook_size=K, num_classes=CLASSES)
    task.build(device=CPU, wrap=lambda m: m)
    batches = helpers.batches_of(
        helpers.chain_tokens(64, grid=GRID, codebook_size=K, num_classes=CLASSES), batch_size=16
    )
    assert task.evaluate(batches(0)) == task.evaluate(batches(0))
    assert task.modules["prior"].training  # evaluate restores the mode


@pytest.mark.parametrize("kind", ["gpt", "maskgit"])
@pytest.mark.parametrize(("grid", "codebook_size"), [((8, 8), 512), ((16, 16), 32), ((2, 5), 2)])
def test_any_grid_and_codebook_size(helpers, kind: str, grid: tuple[int, int], codebook_size: int) -> None:
    from components.prior.gpt import generate as gpt_generate
    from components.prior.maskgit import generate as maskgit_generate

    task = PriorTask(helpers.tiny_prior(kind), _loop(), grid=grid, codebook_size=codebook_size, num_classes=2)
    task.build(device=CPU, wrap=lambda m: m)
    batch = helpers.chain_tokens(2, grid=grid, codebook_size=codebook_size, num_classes=2)
    loss, diagnostics = task.step("main", batch, step=0)
    assert loss.ndim == 0 and loss.item() == pytest.approx(math.log(codebook_size), abs=0.3)
    loss.backward()
    generate = gpt_generate if kind == "gpt" else maskgit_generate
    tokens = generate(task.modules["prior"], torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, grid[0] * grid[1]) and tokens.min() >= 0 and tokens.max() < codebook_size
