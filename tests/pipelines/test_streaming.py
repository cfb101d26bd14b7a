"""Large-data paths at small N, forced by their thresholds: prepare on Ray Data, a streamed fit, encode.

600 procedural shapes go through prepare on Ray Data tasks (same bytes as in-process), a tokenizer
trains on per-worker streaming shards (the split never materialised: the lazy Dataset and the
"streamed" data path are asserted, not timed) and beside it on in-memory arrays, and encode writes
the train split in bounded shards with the streamed tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.data.dataset import MaterializedDataset

from components.data import raydata
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.data.shards import read_meta, read_split, split_files
from components.data.streaming import StreamedShard
from components.data.tokens import (
    TOKENS_SCHEMA_VERSION,
    encode_split,
    read_tokens,
    token_training_split,
    write_token_split,
)
from components.io import save_model
from components.storage import Bucket, publish
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.task import TokenizerTask
from components.tokenizer.vqgan import VQGAN
from components.training.config import LoopConfig, TrainConfig
from components.training.ray_adapter import fit
from tests.s3 import s3, s3_env  # noqa: F401  (the session's S3 server)

N, SHARD_ROWS, BATCH = 600, 64, 32
FORCE_STREAM = {"GENPIPE_IN_DRIVER_BYTES": "0", "GENPIPE_STREAM_BYTES": "0"}
TOKENIZER = TokenizerConfig(
    autoencoder={
        "in_channels": 3,
        "channels": 8,
        "channel_mult": [1, 2],
        "downsample_factor": 2,
        "num_res_blocks": 1,
        "z_channels": 4,
        "attention": False,
    },
    quantizer={"kind": "vq", "codebook_size": 16, "ema": True},
    loss={"perceptual_weight": 0.0, "disc": {"weight": 0.0}},
)


def _cfg() -> PrepareConfig:
    return PrepareConfig(
        source="builtin:shapes",
        channels=3,
        image_size=8,
        shard_rows=SHARD_ROWS,
        shapes={"count": N, "size": 16},
    )


def _snapshot(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def ray_local(s3):  # noqa: F811
    saved = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # report() returns fast (default poll: 2 s)
    if ray.is_initialized():
        ray.shutdown()
    # 2 one-CPU Train workers plus one CPU for the Ray Data tasks that feed them.
    # The session's S3 server's key and endpoint reach every worker, as on a cluster's nodes.
    env = {"env_vars": s3.env}
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, runtime_env=env)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = saved


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory) -> Path:
    """The shapes prepared on Ray Data tasks (ray_from=0 forces that path)."""
    out = tmp_path_factory.mktemp("stream") / "processed"
    lines: list[str] = []
    started: list[bool] = []
    build_dataset(_cfg(), out, log=lines.append, ray_from=0, start_ray=lambda: started.append(True))
    assert started and "on Ray Data" in lines[0]
    return out


@pytest.fixture
def force_stream(monkeypatch):
    for key, value in FORCE_STREAM.items():
        monkeypatch.setenv(key, value)


def test_prepare_on_ray_matches_in_process(prepared, tmp_path):
    lines: list[str] = []
    build_dataset(_cfg(), tmp_path / "local", log=lines.append, ray_from=N + 1)  # below: in-process
    assert "on Ray Data" not in lines[0]
    assert _snapshot(prepared) == _snapshot(tmp_path / "local")  # PNGs, hash, mean/std: the same bytes
    meta = read_meta(prepared)
    assert sum(meta["counts"].values()) == N
    for split in ("train", "val", "test"):
        rows = [pq.read_metadata(f).num_rows for f in split_files(prepared, split)]
        assert sum(rows) == meta["counts"][split] and max(rows) <= SHARD_ROWS
        assert len(rows) == math.ceil(meta["counts"][split] / SHARD_ROWS)


def test_streamed_shard_epochs(ray_local, prepared, force_stream):
    assert not isinstance(raydata.training_split(prepared, "train"), MaterializedDataset)  # lazy when forced
    # The shard's epochs over the decoded rows (materialised here: no read tasks, the test stays fast).
    ds = raydata.from_columns(raydata.read_columns(prepared, "train"))
    n = read_meta(prepared)["counts"]["train"]
    shard = StreamedShard(ds.iterator(), micro=BATCH, seed=0, rank=0, device=torch.device("cpu"), buffer=128)
    epochs = [list(shard(epoch)) for epoch in (0, 1)]
    for batches in epochs:
        assert len(batches) == n // BATCH  # drop_last: equal batches only
        assert all(
            b["image"].shape == (BATCH, 3, 8, 8) and b["image"].dtype == torch.float32 for b in batches
        )
    labels = [torch.cat([b["label"] for b in batches]) for batches in epochs]
    assert not torch.equal(labels[0], labels[1])  # a new shuffle every epoch


@pytest.fixture(scope="module")
def streamed_fit(ray_local, prepared, tmp_path_factory):
    """(the splits, the fit) of a tokenizer trained on per-worker streamed shards on 2 workers (the
    in-memory path is every stage test's)."""
    loop = LoopConfig(steps=16, batch_size=BATCH, lr=2e-3, log_every=4, checkpoint_every=16)
    saved = {k: os.environ.get(k) for k in FORCE_STREAM}
    os.environ.update(FORCE_STREAM)
    try:
        datasets = {split: raydata.training_split(prepared, split) for split in ("train", "val")}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    result = fit(
        task_factory=partial(TokenizerTask, TOKENIZER, loop),
        loop=loop,
        train=TrainConfig(
            num_workers=2, storage_path=str(tmp_path_factory.mktemp("fits") / "ray"), max_failures=0
        ),
        run_name="stream-streamed",
        datasets=datasets,
        shuffle_buffer=128,
    )
    return datasets, result


def test_a_streamed_fit_trains(streamed_fit):
    datasets, streamed = streamed_fit
    assert not isinstance(datasets["train"], MaterializedDataset)  # the driver never held the split
    assert streamed.data == "streamed"
    # 16 steps of 32 over 420 rows on 2 workers: the run crossed an epoch boundary
    assert streamed.state()["step"] == 16 and streamed.state()["epoch"] >= 1
    assert all(math.isfinite(v) for v in streamed.metrics.values())
    assert any(k.startswith("val/") for k in streamed.metrics)


def test_encode_streams_in_bounded_shards_a_bucket_serves_back(
    streamed_fit,
    prepared,
    tmp_path,
    s3_env,  # noqa: F811
    force_stream,
):
    _, result = streamed_fit
    vqgan = result.load_module("vqgan", VQGAN(TOKENIZER), ema_module=TokenizerTask.ema_module)
    save_model(tmp_path / "tokenizer", vqgan.state_dict(), vqgan.config_dict())
    out = tmp_path / "tokens"
    out.mkdir()
    batches = encode_split(prepared, "train", model_dir=tmp_path / "tokenizer", batch_size=50)
    names, rows = write_token_split(
        batches, out_dir=out, split="train", grid=(4, 4), latent_dim=4, shard_rows=100
    )
    n = read_meta(prepared)["counts"]["train"]
    sizes = [pq.read_metadata(out / name).num_rows for name in names]
    assert rows == n == sum(sizes) and sizes[:-1] == [100] * (len(sizes) - 1) and 0 < sizes[-1] <= 100
    ids = np.concatenate(
        [pq.read_table(out / name, columns=["id"]).column("id").to_numpy() for name in names]
    )
    assert ids.tolist() == read_split(prepared, "train").column("id").to_pylist()  # in shard order

    # What a prior reads on a node that has only the bucket: the tokens published under a DVC md5,
    # read by Ray Data's tasks from there, equal to the folder's rows.
    (out / "meta.json").write_text(
        json.dumps(
            {
                "schema_version": TOKENS_SCHEMA_VERSION,
                "grid": [4, 4],
                "latent_channels": 4,
                "counts": {"train": rows, "val": 0, "test": 0},
                "shards": {"train": names, "val": [], "test": []},
            }
        )
    )
    bucket = Bucket(name=s3_env.bucket, prefix="tokens", endpoint_url=s3_env.endpoint, region="us-east-1")
    remote = publish(out, md5=hashlib.md5(str(tmp_path).encode()).hexdigest() + ".dir", bucket=bucket)
    assert {k.rsplit("/", 1)[-1] for k in s3_env.keys(f"tokens/data/{remote.path.rsplit('/', 1)[-1]}/")} >= {
        *names,
        "meta.json",
    }
    lazy = token_training_split(out, "train", published=remote)
    assert not isinstance(lazy, MaterializedDataset)  # forced to stream: read tasks, not the driver
    got = {
        k: np.concatenate([b[k] for b in lazy.iter_batches(batch_format="numpy")])
        for k in ("tokens", "label")
    }
    local = read_tokens(out, "train")
    order = lambda a: np.lexsort(a["tokens"].reshape(len(a["label"]), -1).T)  # noqa: E731
    for key in ("tokens", "label"):
        assert np.array_equal(got[key][order(got)], local[key][order(local)]), key


def test_a_bad_image_on_ray_is_one_line_naming_it(ray_local, tmp_path):
    from PIL import Image

    from components.data.images import BadImageError

    for cls in ("a", "b"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (6, 6), (40 * i, 9, 9)).save(tmp_path / "in" / cls / f"{i}.png")
    bad = tmp_path / "in" / "b" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = PrepareConfig(
        source=f"imagefolder:{tmp_path / 'in'}", image_size=4, split={"val": 0.0, "test": 0.25}
    )
    with pytest.raises(BadImageError, match=f"^bad image {bad}: corrupt or truncated image") as err:
        build_dataset(cfg, tmp_path / "out", log=lambda _: None, ray_from=0)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    skip = cfg.model_copy(update={"on_bad_image": "skip"})
    report = build_dataset(skip, tmp_path / "out", log=lambda _: None, ray_from=0)
    assert report["meta"]["skipped"] == [str(bad)] and report["num_train"] + report["num_test"] == 8


def test_data_mode_by_size(ray_local, prepared, monkeypatch):
    from components.data.streaming import data_mode, ingest_options

    columns = raydata.read_columns(prepared, "train")
    lazy = raydata.ray_dataset(prepared, "train", materialize=False)
    assert data_mode({"train": columns, "val": columns}, workers=2) == "in_memory"
    assert data_mode({"train": lazy}, workers=2) == "streamed"
    assert data_mode({"train": columns, "val": lazy}, workers=2) == "cached"  # train joins as a Dataset
    materialized = raydata.from_columns(columns)
    assert data_mode({"train": materialized}, workers=1) == "in_memory"
    monkeypatch.setenv("GENPIPE_IN_MEMORY_BYTES", "0")
    assert data_mode({"train": materialized}, workers=1) == "cached"
    monkeypatch.setenv("GENPIPE_CACHE_BYTES", str(materialized.size_bytes()))  # a worker's share: too big
    assert data_mode({"train": materialized}, workers=1) == "streamed"
    assert data_mode({"train": materialized}, workers=2) == "cached"
    assert ingest_options("cached") is None and ingest_options("in_memory") is None  # Train's defaults
    monkeypatch.setenv("GENPIPE_READ_AHEAD_BYTES", str(64 * 1024**2))
    assert ingest_options("streamed").resource_limits.object_store_memory == 64 * 1024**2


def test_prepare_stage_threshold(monkeypatch):
    from pipelines.prepare import RAY_FROM, ray_from

    monkeypatch.delenv("GENPIPE_PREPARE_RAY_FROM", raising=False)
    assert ray_from() == RAY_FROM > 1797  # the default digits convert in the stage process
    monkeypatch.setenv("GENPIPE_PREPARE_RAY_FROM", "600")
    assert ray_from() == 600
    monkeypatch.setenv("GENPIPE_PREPARE_RAY_FROM", "many")
    with pytest.raises(ValueError, match="GENPIPE_PREPARE_RAY_FROM='many' is not an integer image count"):
        ray_from()


@pytest.mark.timeout(60)
def test_streamed_split_with_every_cpu_held_is_one_line(ray_local, prepared, force_stream, tmp_path):
    # 3 one-CPU workers on this 3-CPU instance would leave Ray Data's read tasks no CPU: the fit
    # would hang in the split coordinator for ever. It stops before training, naming the knobs.
    loop = LoopConfig(steps=2, batch_size=3 * 4, lr=1e-3, log_every=1, checkpoint_every=2)
    datasets = {"train": raydata.training_split(prepared, "train")}
    assert not isinstance(datasets["train"], MaterializedDataset)
    with pytest.raises(ValueError) as err:
        fit(
            task_factory=partial(TokenizerTask, TOKENIZER, loop),
            loop=loop,
            train=TrainConfig(num_workers=3, storage_path=str(tmp_path / "ray"), max_failures=0),
            run_name="starved",
            datasets=datasets,
        )
    line = str(err.value)
    assert "\n" not in line
    for name in ("train.num_workers=3", "train.cpus_per_worker=1", "of the cluster's 3 CPUs", "split train"):
        assert name in line
    assert not (tmp_path / "ray").exists()  # nothing started


def test_streamed_reads_are_bounded(ray_local, prepared, monkeypatch):
    # Read tasks of at most BLOCK_BYTES of Parquet, blocks of at most BLOCK_BYTES: with 1 byte each
    # shard is its own read task (Ray 2.60 alone packs them into tasks of up to 128 MiB).
    files = split_files(prepared, "train")
    monkeypatch.delenv("RAY_DATA_PARQUET_BIN_PACKING_BYTES", raising=False)
    lazy = raydata.ray_dataset(prepared, "train", materialize=False)
    assert lazy.context.target_max_block_size == raydata.BLOCK_BYTES
    assert "RAY_DATA_PARQUET_BIN_PACKING_BYTES" not in os.environ  # restored after the read was planned
    monkeypatch.setenv("GENPIPE_BLOCK_BYTES", "1")  # (uncapped, Ray packs them: the next test)
    tiny = raydata.ray_dataset(prepared, "train", materialize=False).materialize()
    assert tiny.num_blocks() >= len(files)
    assert tiny.count() == read_meta(prepared)["counts"]["train"]


def _footer_readers() -> int:
    """FooterReader actors this Ray instance has started, live or dead (Ray Data's Parquet listing)."""
    from ray._private import state  # tests may read Ray internals

    return sum(a["ActorClassName"] == "FooterReader" for a in state.actors().values())


def test_parquet_reads_are_trims_that_can_be_turned_off(ray_local, prepared, monkeypatch):
    # Both caps go through Ray-internal variables, so they are version-gated trims. Read tasks: at
    # most BLOCK_BYTES of Parquet (each of these small shards its own task, so one block each); off,
    # Ray packs them. The listing: Ray 2.60 reads the files' footers on 32 actors per read, a process
    # start each (~1 min of a 1-CPU node for a three-file split); trimmed, one per 64 files.
    files = [str(f) for f in split_files(prepared, "train")]
    assert len(files) <= raydata.FOOTERS_PER_ACTOR
    for key in ("RAY_DATA_PARQUET_BIN_PACKING_BYTES", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GENPIPE_BLOCK_BYTES", "1")
    before = _footer_readers()
    capped = raydata.read_parquet(files).materialize()  # count() alone lists no footers
    assert capped.num_blocks() == len(files) and _footer_readers() - before == 1
    monkeypatch.setenv("GENPIPE_RAY_TRIMS_OFF", "parquet_read_tasks,parquet_footer_actors")
    before = _footer_readers()
    stock = raydata.read_parquet(files).materialize()
    assert stock.num_blocks() < len(files) and _footer_readers() - before == 32
    assert stock.count() == capped.count() == read_meta(prepared)["counts"]["train"]
    assert not {"RAY_DATA_PARQUET_BIN_PACKING_BYTES", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"} & set(os.environ)
