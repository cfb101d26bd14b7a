"""Streamed statistics equal the one-shot ones: feature mean/covariance, per-channel latent moments,
the reference statistics of a sharded split, and the scorer; NaN/Inf is one line naming the culprit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.images import encode_png
from components.data.shards import SCHEMA_VERSION, write_meta, write_shards
from components.data.tokens import TOKENS_SCHEMA_VERSION, read_tokens, write_token_split
from components.diffusion.config import DiffusionConfig
from components.diffusion.sizing import latent_scaling, latent_stats
from components.diffusion.task import DiffusionTask
from components.evaluation.batches import SplitImages
from components.evaluation.evaluator import Evaluator, EvaluatorConfig
from components.evaluation.frechet import StatsAccumulator
from components.evaluation.moments import ChannelMoments
from components.evaluation.reference import compute_reference, reference_from_data
from components.evaluation.scorer import SampleScorer, check_images
from components.training.config import LoopConfig

N = 53  # prime: no batch size below divides it
BATCHES = [1, 4, 7, N, 100]  # a batch of 1, sizes that leave a short last batch, one batch, more than N


def _split(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.split(size))


@pytest.mark.parametrize("size", BATCHES)
def test_feature_statistics_stream_to_the_one_shot_mean_and_covariance(size):
    rng = np.random.default_rng(0)
    f = rng.normal(loc=3.0, scale=2.0, size=(N, 6)) @ rng.normal(size=(6, 6))  # correlated, off-centre
    acc = StatsAccumulator()
    for batch in _split(torch.from_numpy(f), size):
        acc.update(batch)
    stats = acc.stats()
    assert stats.n == N
    np.testing.assert_allclose(stats.mu.numpy(), f.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(f, rowvar=False), rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", BATCHES)
def test_channel_moments_stream_to_the_one_shot_mean_and_std(size):
    z = torch.randn(N, 5, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4 + 7
    moments = ChannelMoments(5)
    for batch in _split(z, size):
        moments.update(batch)
    torch.testing.assert_close(moments.mean(), z.mean(dim=(0, 2, 3)), rtol=0, atol=1e-10)
    torch.testing.assert_close(moments.std(), z.std(dim=(0, 2, 3)), rtol=0, atol=1e-10)


def test_non_finite_values_are_one_line_errors():
    acc, moments = StatsAccumulator(), ChannelMoments(2)
    bad = torch.ones(4, 2)
    bad[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        acc.update(bad)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        moments.update(bad[:, :, None])
    images = torch.zeros(3, 1, 8, 8)
    images[1, 0, 4, 4] = float("inf")
    with pytest.raises(FloatingPointError) as err:
        check_images(images, shape=(1, 8, 8), start=10, source="set.npz")
    assert str(err.value) == "set.npz: image 11 has non-finite pixels (NaN or Inf)"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared directory of random 8x8 grey images in shards of 7 rows (the last one short)."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(2)
    shards, counts = {}, {}
    for split, n in (("train", 40), ("val", 3), ("test", 30)):
        rows = [
            (f"{split}-{i}", encode_png(Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))), i % 3)
            for i in range(n)
        ]
        shards[split] = write_shards(rows, out_dir=root, split=split, shard_rows=7)
        counts[split] = n
    meta = {"schema_version": SCHEMA_VERSION, "image_size": 8, "channels": 1, "num_classes": 3}
    write_meta({**meta, "class_names": ["a", "b", "c"], "counts": counts, "shards": shards}, out_dir=root)
    return root


def test_split_images_streams_every_image_in_shard_order(prepared):
    from components.data.readers import ShardDataset

    whole = ShardDataset(prepared, "train").images
    batches = list(SplitImages(prepared, "train", batch_size=3))
    assert len(SplitImages(prepared, "train")) == 40 and max(b.shape[0] for b in batches) == 3
    torch.testing.assert_close(torch.cat(batches), whole, rtol=0, atol=0)


def test_reference_streamed_from_shards_equals_the_one_shot_reference(prepared):
    from components.data.readers import ShardDataset

    torch.manual_seed(0)
    net = Evaluator(EvaluatorConfig(widths=(8,), feature_dim=8), in_channels=1, num_classes=3).eval()
    whole = compute_reference(
        net, train=ShardDataset(prepared, "train").images, test=ShardDataset(prepared, "test").images
    )
    for size in (1, 6):
        streamed = reference_from_data(net, prepared, batch_size=size)
        for got, want in ((streamed.train, whole.train), (streamed.test, whole.test)):
            assert got.n == want.n
            torch.testing.assert_close(got.mu, want.mu, rtol=0, atol=1e-6)  # features: float32 per batch
            torch.testing.assert_close(got.sigma, want.sigma, rtol=0, atol=1e-6)
        assert streamed.floor == pytest.approx(whole.floor, rel=1e-4)


def _latent_shards(tmp_path) -> torch.Tensor:
    """A token split of 29 rows in 4 shards whose latents' channels have std 1..4 and mean 5."""
    grid, d, n = (2, 3), 4, 29
    rng = np.random.default_rng(3)
    latent = (rng.normal(size=(n, d, *grid)) * np.arange(1, d + 1)[None, :, None, None] + 5).astype(
        np.float32
    )
    batch = {
        "id": np.array([f"r{i}" for i in range(n)]),
        "label": np.zeros(n, np.int32),
        "tokens": np.zeros((n, grid[0] * grid[1]), np.int32),
        "latent": latent.reshape(n, -1),
    }
    names, _ = write_token_split(
        iter([batch]), out_dir=tmp_path, split="train", grid=grid, latent_dim=d, shard_rows=8
    )
    meta = {"schema_version": TOKENS_SCHEMA_VERSION, "grid": list(grid), "latent_channels": d}
    (tmp_path / "meta.json").write_text(
        json.dumps({**meta, "shards": {"train": names, "val": [], "test": []}})
    )
    assert len(names) == 4  # 8 + 8 + 8 + 5 rows
    return torch.from_numpy(read_tokens(tmp_path, "train")["latent"]).double()


def test_latent_stats_stream_shards_to_the_one_shot_statistics(tmp_path):
    z = _latent_shards(tmp_path)
    want_mean, want_std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    for rows in (1, 3, 1000):
        mean, std = latent_stats(tmp_path, batch_rows=rows)
        np.testing.assert_allclose(mean, want_mean.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(std, want_std.numpy(), rtol=0, atol=1e-10)


def test_the_scorer_gives_one_figure_set_whatever_the_batches():
    torch.manual_seed(0)
    net = Evaluator(EvaluatorConfig(widths=(8,), feature_dim=8), in_channels=1, num_classes=3).eval()
    fake, real = torch.rand(31, 1, 8, 8) * 2 - 1, torch.rand(40, 1, 8, 8) * 2 - 1
    labels = torch.arange(31) % 3
    reference = compute_reference(net, train=real, test=real)
    real_f = net.features(real).detach()
    figures = []
    for size in (1, 5, 31):
        scorer = SampleScorer(net, image_shape=(1, 8, 8), num_classes=3, accuracy=True, grid_columns=4)
        for x, y in zip(fake.split(size), labels.split(size), strict=True):
            scorer.add(x, y)
        figures.append(scorer.metrics(test_stats=reference.test, real_features=real_f, floor=1.0, pr_k=3))
        grid = scorer.grid_images()
        assert grid.shape == (3 * 4, 1, 8, 8)  # one row of 4 per class
        torch.testing.assert_close(grid[:4], fake[labels == 0][:4])
    want = float((net(fake).argmax(dim=1) == labels).float().mean())
    for got in figures:
        assert got["cond_accuracy"] == pytest.approx(want) and got["num_samples"] == 31
        for key in ("fid", "precision", "recall"):
            assert got[key] == pytest.approx(figures[-1][key], rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_latent_models_learn_latents_at_the_spread_their_sigmas_assume(tmp_path, sigma_data):
    """EDM's preconditioner and noise levels assume data of std sigma_data (pixels in [-1, 1]: 0.5);
    the stored standardisation must bring every latent channel there, and the generator's inverse
    (z * std + mean) must give the latents back."""
    z = _latent_shards(tmp_path)
    model = DiffusionConfig(sigma_data=sigma_data, backbone={"in_channels": 4, "channels": 8})
    mean, std = latent_scaling(tmp_path, model)
    task = DiffusionTask(
        model,
        LoopConfig(steps=1, batch_size=8, lr=1e-3),
        input_key="latent",
        latent_mean=mean,
        latent_std=std,
    )
    x0, _ = task._inputs({"latent": z.float(), "label": torch.zeros(len(z))})
    spread = x0.double().std(dim=(0, 2, 3))
    torch.testing.assert_close(spread, torch.full_like(spread, sigma_data), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        x0.double().mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.double), atol=1e-5, rtol=0
    )
    back = x0 * torch.tensor(std).reshape(1, -1, 1, 1) + torch.tensor(mean).reshape(1, -1, 1, 1)
    torch.testing.assert_close(back.double(), z, rtol=0, atol=1e-4)
