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
    if out is None or out.get("md5") != dvc_md5(data_dir):
        raise StorageError(
            f"{rel} differs from its record in dvc.lock (or has none): run `dvc repro` (or `dvc commit`) "
            "for the stage that writes it, so the bucket copy is keyed by its DVC md5"
        )
    return publish(data_dir, md5=out["md5"], bucket=bucket, log=print)


def dvc_md5(folder: Path) -> str:
    """The folder's DVC md5 ('<32 hex>.dir'), computed as `dvc add` or `dvc commit` would: the md5 of
    each file, then of the sorted listing (dvc_data's Tree). ~1 s per GiB, read in 1 MiB chunks."""
    import hashlib

    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            md5 = hashlib.file_digest(f, "md5").hexdigest()
        tree.add(path.relative_to(folder).parts, Meta(size=path.stat().st_size), HashInfo("md5", md5))
    tree.digest()
    return tree.hash_info.value
