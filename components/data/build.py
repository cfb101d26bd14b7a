"""Build the prepared dataset: source -> stratified split -> standardised PNG shards + meta.json.

The build writes into a hidden sibling directory and swaps it in at the end (an atomic exchange of
the two directories on Linux), so a failure or a kill at any point leaves the previous output intact.
It streams: records are converted in the planned order and each shard is written as it fills, so
memory holds one shard of PNGs, whatever the number of images. A large source is converted by Ray
Data tasks (components/data/convert.py) instead of in this process; the bytes are the same.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.data import convert
from components.data.config import PrepareConfig
from components.data.images import DataError
from components.data.shards import (
    SCHEMA_VERSION,
    SPLITS,
    Row,
    RowHasher,
    combine_hashes,
    write_meta,
    write_shards,
)
from components.data.sources import UNLABELLED, Source, open_source

Log = Callable[[str], None]
PROGRESS_MIN = 1000  # below this many images the build is quick: no progress lines


def stratified_split(labels: Sequence[int], *, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Per class, round(n*test) to test and round(n*val) to val (train keeps at least one); shuffled."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(y):  # sorted: the draw order does not depend on the source order of classes
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx)
        n_test = min(math.floor(n * test + 0.5), n - 1)
        n_val = min(math.floor(n * val + 0.5), n - 1 - n_test)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    # shuffle each split so every shard mixes the classes
    return {s: rng.permutation(np.concatenate(v)) if v else np.zeros(0, np.int64) for s, v in parts.items()}


def _class_name(label: int, names: Sequence[str]) -> str:
    return "unlabelled" if label == UNLABELLED else names[label]


def _check_source(source: Source, cfg: PrepareConfig) -> np.ndarray:
    """Fail before any pixel work: empty source, duplicate ids, classes below min_per_class; the labels."""
    if not len(source.records):
        raise DataError(f"prepare.source={cfg.source!r} yielded no images (empty dataset)")
    if not source.unique_ids:
        seen: set[str] = set()
        for r in source.records:
            if r.id in seen:
                raise DataError(f"duplicate image id {r.id!r} ({r.origin})")
            seen.add(r.id)
    labels = source.label_array()
    values, counts = np.unique(labels, return_counts=True)
    _check_class_sizes(
        Counter(dict(zip(values.tolist(), counts.tolist(), strict=True))), source.class_names, cfg
    )
    return labels


def _check_class_sizes(
    counts: Counter, names: Sequence[str], cfg: PrepareConfig, *, skipped: int = 0
) -> None:
    labels = [UNLABELLED] if not names else range(len(names))
    note = f" (after skipping {skipped} bad)" if skipped else ""
    for label in labels:
        if counts.get(label, 0) < cfg.min_per_class:
            raise DataError(
                f"class {_class_name(label, names)!r} has {counts.get(label, 0)} images{note}, fewer than "
                f"prepare.min_per_class={cfg.min_per_class}"
            )


def _check_splits(counts: dict[str, int], cfg: PrepareConfig) -> None:
    for split in ("val", "test"):
        frac = getattr(cfg.split, split)
        if frac > 0 and counts[split] == 0:
            raise DataError(
                f"prepare.split.{split}={frac} leaves the {split} split empty ({sum(counts.values())} images); "
                f"raise it or add images"
            )
    if counts["train"] == 0:
        raise DataError("prepare.split leaves the train split empty")


class _Progress:
    """Periodic 'n/total (rate/s, ETA)' lines for long builds."""

    def __init__(self, total: int, *, log: Log) -> None:
        self.total, self.log, self.done = total, log, 0
        self.every = max(500, total // 10)
        self.t0 = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.total >= PROGRESS_MIN and (self.done % self.every == 0 or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log(f"prepare: {self.done}/{self.total} images ({rate:.0f}/s, ETA {eta:.0f}s)")


class _Stats:
    """Per-channel sum and sum of squares of [0, 1] pixels (float64 for exactness over many images)."""

    def __init__(self, channels: int) -> None:
        self.s = np.zeros(channels)
        self.ss = np.zeros(channels)
        self.n = 0

    def add(self, sums: np.ndarray, pixels: int) -> None:
        """One image's (2, C) sums (convert.pixel_sums), added in row order."""
        self.s += sums[0]
        self.ss += sums[1]
        self.n += pixels

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.s / max(self.n, 1)
        var = np.maximum(self.ss / max(self.n, 1) - mean**2, 0.0)
        return mean.tolist(), np.sqrt(var).tolist()


@dataclass
class _Tally:
    """What one split's rows add up to: content hash, class counts, pixel statistics (train only)."""

    hasher: RowHasher = field(default_factory=RowHasher)
    classes: Counter = field(default_factory=Counter)
    stats: _Stats | None = None


def _rows(
    items: Iterable[convert.Converted],
    *,
    cfg: PrepareConfig,
    tally: _Tally,
    skipped: list[str],
    progress: _Progress,
    log: Log,
) -> Iterator[Row]:
    """Standardised PNG rows of one split; bad images raise, or are logged and appended to `skipped`."""
    for item in items:
        progress.step()
        if item.bad is not None:
            if cfg.on_bad_image == "error":
                raise item.bad
            log(f"prepare: skipped {item.bad.path}: {item.bad.reason}")
            skipped.append(item.bad.path)
            continue
        tally.hasher.update(item.id, item.png, item.label)
        tally.classes[item.label] += 1
        if tally.stats is not None:
            tally.stats.add(item.sums, item.pixels)
        yield item.id, item.png, item.label


def _write_all(
    source: Source, plan: dict[str, np.ndarray], *, cfg: PrepareConfig, out: Path, log: Log, on_ray: bool
) -> dict:
    """Write every split's shards and meta.json into `out`; returns meta."""
    progress = _Progress(sum(len(v) for v in plan.values()), log=log)
    order = np.concatenate([plan[s] for s in SPLITS])  # the splits one after the other, as written
    items = convert.on_ray(order, cfg=cfg) if on_ray else convert.local(source, order, cfg=cfg)
    stats = _Stats(cfg.channels)
    skipped: list[str] = []
    shards, tallies = {}, {}
    try:
        for split in SPLITS:
            tally = tallies[split] = _Tally(stats=stats if split == "train" else None)
            part = itertools.islice(items, len(plan[split]))
            rows = _rows(part, cfg=cfg, tally=tally, skipped=skipped, progress=progress, log=log)
            shards[split] = write_shards(rows, out_dir=out, split=split, shard_rows=cfg.shard_rows)
    finally:
        items.close()  # a failed build stops the Ray Data execution now, not at garbage collection
    classes = {s: tallies[s].classes for s in SPLITS}
    hashes = {s: tallies[s].hasher.hexdigest() for s in SPLITS}
    counts = {s: sum(classes[s].values()) for s in SPLITS}
    _check_class_sizes(sum(classes.values(), Counter()), source.class_names, cfg, skipped=len(skipped))
    _check_splits(counts, cfg)
    mean, std = stats.mean_std()
    names = source.class_names
    meta = {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "class_names": list(names),
        "num_classes": len(names),
        "counts": counts,
        "class_counts": {s: {n: classes[s].get(k, 0) for k, n in enumerate(names)} for s in SPLITS},
        "num_skipped": len(skipped),
        "skipped": skipped,
        "mean": mean,
        "std": std,
        "content_hash": combine_hashes(hashes),
        "shards": shards,
        "prepare": recorded_settings(cfg),
    }
    write_meta(meta, out_dir=out)
    return meta


def recorded_settings(cfg: PrepareConfig) -> dict[str, Any]:
    """The settings meta.json records: all but `dvc_dep` (bookkeeping, not data), and the glyph
    block only when it is the source (a default digits build keeps the bytes it had before it)."""
    exclude = {"dvc_dep"} | (set() if cfg.source == "builtin:glyphs" else {"glyphs"})
    return cfg.model_dump(mode="json", exclude=exclude)


@dataclass(frozen=True)
class Plan:
    """A checked source and its split: what build_dataset writes, known before any pixel work."""

    source: Source
    labels: np.ndarray  # (N,) in record order
    splits: dict[str, np.ndarray]  # split -> record indices


def plan_dataset(cfg: PrepareConfig, *, log: Log = print) -> Plan:
    """Open and check the source and plan its split; every refusal that needs no pixels happens here.

    A class left without val or test images (a small class that `min_per_class` lets through) is
    named in one warning line: its test statistics and accuracy rest on no images.
    """
    source = open_source(cfg)
    labels = _check_source(source, cfg)
    splits = stratified_split(labels, val=cfg.split.val, test=cfg.split.test, seed=cfg.seed)
    _check_splits({s: len(v) for s, v in splits.items()}, cfg)
    thin = _thin_classes(labels, splits, source.class_names, cfg)
    if thin:
        shown = ", ".join(thin[:5]) + (f" and {len(thin) - 5} more" if len(thin) > 5 else "")
        log(
            f"prepare: warning: {len(thin)} class(es) without val or test images (train/val/test): {shown}; "
            f"raise prepare.min_per_class (now {cfg.min_per_class}) or add images"
        )
    return Plan(source=source, labels=labels, splits=splits)


def _thin_classes(
    labels: np.ndarray, splits: dict[str, np.ndarray], names: Sequence[str], cfg: PrepareConfig
) -> list[str]:
    """'name' t/v/e for each class with no test image, or no val image where val > 0."""
    k = max(len(names), 1)
    per = {s: np.bincount(np.maximum(labels[idx], 0), minlength=k) for s, idx in splits.items()}
    out = []
    for c in range(k):
        if per["test"][c] == 0 or (cfg.split.val > 0 and per["val"][c] == 0):
            name = _class_name(c if names else UNLABELLED, names)
            out.append(f"{name!r} {per['train'][c]}/{per['val'][c]}/{per['test'][c]}")
    return out


def build_dataset(
    cfg: PrepareConfig,
    out_dir: Path,
    *,
    log: Log = print,
    ray_from: int | None = None,
    start_ray: Callable[[], None] | None = None,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """Prepare cfg.source into out_dir atomically; returns the prepare metrics plus `meta`.

    A source of at least `ray_from` images (None: never) is converted on Ray Data, after
    `start_ray()` (the caller's way to join or start Ray); a smaller one in this process. `plan`:
    plan_dataset(cfg) when the caller already checked the source (a stage, before its MLflow run).
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(out_dir, log=log)
    t0 = time.perf_counter()
    if plan is None:
        plan = plan_dataset(cfg, log=log)
    source, labels, splits = plan.source, plan.labels, plan.splits
    on_ray = ray_from is not None and len(labels) >= ray_from
    where = " on Ray Data" if on_ray else ""
    log(f"prepare: {len(labels)} images from {cfg.source}, {len(source.class_names)} classes{where}")
    if on_ray and start_ray is not None:
        start_ray()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = _write_all(source, splits, cfg=cfg, out=tmp, log=log, on_ray=on_ray)
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new data on error, the previous output on success
    log(f"prepare: wrote {out_dir} in {time.perf_counter() - t0:.1f}s ({meta['content_hash'][:19]}...)")
    report: dict[str, Any] = {f"num_{s}": float(meta["counts"][s]) for s in SPLITS}
    report.update(num_classes=float(meta["num_classes"]), num_skipped=float(meta["num_skipped"]), meta=meta)
    return report


# --- atomic replacement ---------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, out_dir: Path) -> None:
    """Put `new` at out_dir; afterwards `new` holds the previous output (if any) for deletion."""
    if not out_dir.exists():
        new.rename(out_dir)
        new.mkdir()  # the caller deletes `new`; keep the path valid
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory")
    if _exchange(new, out_dir):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)  # a kill between these renames is repaired by _recover on the next build
    try:
        new.rename(out_dir)
    except OSError:
        old.rename(out_dir)
        raise
    old.rename(new)


def _recover(out_dir: Path, *, log: Log) -> None:
    """Clean up after a killed build: restore a moved-away output, delete half-written temporaries."""
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists():
        olds.pop().rename(out_dir)
        log(f"prepare: restored {out_dir} from an interrupted build")
    for p in [*olds, *out_dir.parent.glob(f".{out_dir.name}.tmp-*")]:
        log(f"prepare: removing leftover {p}")
        shutil.rmtree(p, ignore_errors=True)
