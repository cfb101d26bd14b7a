"""The evaluator network, its augmentation, its training task (through the real loop) and its I/O."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from components.evaluation.evaluator import (
    Evaluator,
    EvaluatorConfig,
    EvaluatorTask,
    cond_accuracy,
    load_evaluator,
    predict,
    random_shift,
    save_evaluator,
)
from components.evaluation.frechet import feature_stats, frechet_distance
from components.training.config import LoopConfig
from components.training.loop import train

torch.set_num_threads(1)

SMALL = EvaluatorConfig(widths=(8, 16, 16), feature_dim=12, norm_groups=4)


def _quadrants(n: int, *, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two classes: a bright blob in the top-left (0) or bottom-right (1) quadrant, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, size, size, generator=g) * 0.4 - 1
    q = size // 2
    for i in range(n):
        r = 2 if y[i] == 0 else q + 2
        x[i, :, r : r + q - 4, r : r + q - 4] = 1.0
    return {"image": x, "label": y}


@pytest.mark.parametrize(("channels", "size"), [(1, 16), (3, 16), (1, 32), (3, 32), (1, 8)])
def test_shapes(channels: int, size: int) -> None:
    net = Evaluator.from_config(SMALL, in_channels=channels, num_classes=10).eval()
    x = torch.rand(4, channels, size, size) * 2 - 1
    assert net(x).shape == (4, 10)
    assert net.features(x).shape == (4, 12 + channels * 4) and net.feature_dim == 12 + channels * 4
    maps = net.feature_maps(x)
    sides = [size, size // 2, size // 4]
    assert [tuple(m.shape) for m in maps] == [(4, w, s, s) for w, s in zip(SMALL.widths, sides, strict=True)]


def test_default_model_is_small() -> None:
    net = Evaluator.from_config(EvaluatorConfig(), in_channels=1, num_classes=10)
    n = sum(p.numel() for p in net.parameters())
    assert 100_000 < n < 1_000_000


def test_rejects_bad_input_and_config() -> None:
    net = Evaluator.from_config(SMALL, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="H, W >= 8"):
        net(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValidationError, match="norm_groups"):
        EvaluatorConfig(widths=(12, 16), norm_groups=8)
    with pytest.raises(ValidationError, match="extra"):
        EvaluatorConfig.model_validate({"widths": [8], "norm_groups": 8, "depth": 3})


def test_config_round_trip_and_save_load(tmp_path) -> None:
    net = Evaluator.from_config(SMALL, in_channels=3, num_classes=4).eval()
    d = json.loads(json.dumps(net.to_dict()))
    assert Evaluator.from_dict(d).to_dict() == net.to_dict()
    save_evaluator(net, tmp_path / "ev")
    back = load_evaluator(tmp_path / "ev")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(back.features(x), net.features(x), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["config.json", "model.safetensors"]


def test_random_shift_moves_a_pixel_within_range() -> None:
    torch.manual_seed(0)
    x = torch.full((64, 1, 12, 12), -1.0)
    x[:, :, 6, 5] = 1.0
    out = random_shift(x, max_shift=2)
    pos = (out[:, 0] == 1.0).flatten(1).float().argmax(dim=1)
    rows, cols = pos // 12, pos % 12
    assert (out == 1.0).flatten(1).sum(dim=1).eq(1).all()  # the pixel is kept, not duplicated
    assert (rows - 6).abs().max() <= 2 and (cols - 5).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # per-sample offsets
    assert torch.equal(random_shift(x, max_shift=0), x)


def test_task_step_and_evaluate_directly() -> None:
    task = EvaluatorTask(SMALL, LoopConfig(steps=2, batch_size=8, lr=1e-3), in_channels=1, num_classes=2)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    batch = _quadrants(8)
    loss, diag = task.step("main", batch, step=0)
    assert loss.requires_grad and loss.ndim == 0
    assert set(diag) == {"loss", "accuracy"} and 0 <= float(diag["accuracy"]) <= 1
    metrics = task.evaluate([batch, _quadrants(4, seed=1)])
    assert set(metrics) == {"accuracy", "loss"} and metrics["loss"] > 0
    with pytest.raises(ValueError, match="labels in 0..1"):
        task.step("main", {"image": batch["image"], "label": torch.full((8,), -1)}, step=0)
    with pytest.raises(ValueError, match="unknown phase"):
        task.step("critic", batch, step=0)


def test_optimizer_skips_decay_on_norms_and_biases() -> None:
    loop = LoopConfig(steps=2, batch_size=8, lr=1e-3, weight_decay=0.05)
    task = EvaluatorTask(SMALL, loop, in_channels=1, num_classes=2)
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    groups = task.optimizers()["main"].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])


def _bars(n: int, *, seed: int) -> dict[str, torch.Tensor]:
    """Two classes, a horizontal (0) or vertical (1) bar at a random place, RGB: the bar's and the
    background's colours are random, so colour tells the classes nothing (as in builtin:glyphs)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, 16, 16).clone()
    ink = torch.rand(n, 3, generator=g) * 2 - 1
    at = torch.randint(3, 11, (n,), generator=g).tolist()
    for i in range(n):
        rows, cols = (
            (slice(at[i], at[i] + 3), slice(2, 14)) if y[i] == 0 else (slice(2, 14), slice(at[i], at[i] + 3))
        )
        x[i, :, rows, cols] = ink[i, :, None, None]
    return {"image": x, "label": y}


def test_features_see_colour_that_the_classes_ignore() -> None:
    """Grey copies of real images sit far from them in feature space, though the classifier needs no
    colour: a judge blind to colour scored a colourless generator as good as the data (issue #21)."""
    data = _bars(512, seed=0)
    loop = LoopConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, grad_clip=None, log_every=150)
    torch.manual_seed(0)
    task = EvaluatorTask(SMALL, loop, in_channels=3, num_classes=2)

    def batches(epoch: int):
        perm = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 512, 32):
            yield {k: v[perm[i : i + 32]] for k, v in data.items()}

    train(task, loop=loop, batches=batches, device=torch.device("cpu"), progress=False)
    net = task.modules["evaluator"].eval()
    a, b = _bars(400, seed=1), _bars(400, seed=2)
    assert cond_accuracy(net, b["image"], b["label"]) > 0.95  # it learned the shapes
    real = feature_stats(net, a["image"])
    floor = frechet_distance(real, feature_stats(net, b["image"]))
    grey = frechet_distance(
        real, feature_stats(net, b["image"].mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
    )
    assert grey > 10 * floor, (grey, floor)


def test_an_evaluator_saved_before_the_thumbnail_loads_as_it_was(tmp_path) -> None:
    old = Evaluator.from_config(SMALL.model_copy(update={"thumbnail": 0}), in_channels=3, num_classes=2)
    save_evaluator(old, tmp_path / "ev")
    config = json.loads((tmp_path / "ev/config.json").read_text())
    del config["model"]["thumbnail"]  # as written before the field existed
    (tmp_path / "ev/config.json").write_text(json.dumps(config))
    back = load_evaluator(tmp_path / "ev")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert back.feature_dim == 12
    torch.testing.assert_close(back.features(x), old.eval().features(x), rtol=0, atol=0)


def test_task_learns_through_the_loop() -> None:
    data, val = _quadrants(256), _quadrants(64, seed=1)
    loop = LoopConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=4, log_every=20)
    task = EvaluatorTask(SMALL, loop, in_channels=1, num_classes=2)

    def batches(epoch: int):
        perm = torch.randperm(256, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 256, 32):
            yield {k: v[perm[i : i + 32]] for k, v in data.items()}

    metrics = train(
        task,
        loop=loop,
        batches=batches,
        device=torch.device("cpu"),
        val_batches=lambda: [val],
        progress=False,
    )
    assert metrics["val/accuracy"] >= 0.95
    assert "main/accuracy" in metrics
    net = task.modules["evaluator"]
    assert cond_accuracy(net, val["image"], val["label"]) == metrics["val/accuracy"]
    net.eval()
    torch.testing.assert_close(net.classify(net.features(val["image"])), net(val["image"]))


def test_cond_accuracy_counts_requested_labels() -> None:
    net = Evaluator.from_config(SMALL, in_channels=1, num_classes=3)
    x = torch.rand(20, 1, 16, 16) * 2 - 1
    pred = predict(net, x, batch_size=7)
    assert net.training  # predict restores the mode it found
    assert cond_accuracy(net, x, pred) == 1.0
    assert cond_accuracy(net, x, (pred + 1) % 3) == 0.0
    half = torch.where(torch.arange(20) < 5, pred, (pred + 1) % 3)
    assert cond_accuracy(net, x, half) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="must be equal"):
        cond_accuracy(net, x, pred[:3])
