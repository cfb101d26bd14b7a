"""A training stage and the shared bucket (the `storage` section, components/storage.py).

Before Ray starts, the section's endpoint and region go into the stage's environment and an s3://
`train.storage_path` is checked; a data folder that Ray Data reads (data/processed, data/tokens) is
published to the bucket under its DVC md5, so worker nodes read the shards from the bucket, not from
the driver's disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from components.schema import StrictConfig
from components.storage import Published, StorageError, publish, ray_storage, resolve
from pipelines.lineage import dvc_out, repo_root


def use_bucket(sections: dict[str, StrictConfig], storage_path: str | None = None) -> None:
    """The `storage` section's endpoint and region into this process's environment (where the
    standard AWS variables do not already set them), so Ray's filesystem and a local instance's
    workers reach the same bucket; then an s3:// `train.storage_path` is checked, failing in one line
    (wrong endpoint, missing bucket, bad credentials) before anything starts."""
    cfg = sections.get("storage")
    bucket = resolve(cfg) if cfg is not None else None
    if bucket is not None:
        for key, value in bucket.env().items():
            os.environ.setdefault(key, value)
    if storage_path is not None:
        ray_storage(storage_path)


def publish_data(
    sections: dict[str, StrictConfig],
    data_dir: Path,
    *,
    shards: Callable[[str], list[Path]] | None = None,
    splits: tuple[str, ...] = ("train", "val"),
) -> Published | None:
    """With a `storage.bucket`, a DVC-tracked data folder published to the bucket under its DVC md5
    (uploaded once: components.storage.publish), so Ray Data reads the splits that are not read in
    the driver straight from the bucket; None without a bucket, or when every split is driver-small.

    `shards(split)` lists a split's files (default: data/processed's; data/tokens passes its own).
    """
    from components.data.raydata import small  # imports Ray: only where data is read
    from components.data.shards import split_files

    cfg = sections.get("storage")
    bucket = resolve(cfg) if cfg is not None else None
    shards = shards or (lambda split: split_files(data_dir, split))
    if bucket is None or all(small([str(f) for f in shards(s)]) for s in splits):
        return None
    rel = data_dir.resolve().relative_to(repo_root()).as_posix()
    out = dvc_out(rel)
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    if (
        out is None
        or out.get("nfiles") != len(files)
        or out.get("size") != sum(p.stat().st_size for p in files)
    ):
        raise StorageError(
            f"{rel} differs from its record in dvc.lock (or has none): run `dvc repro` (or `dvc commit`) "
            "for the stage that writes it, so the bucket copy is keyed by its DVC md5"
        )
    return publish(data_dir, md5=out["md5"], bucket=bucket, log=print)
