"""Image sources: built-ins (digits, shapes; glyphs in glyphs.py), a folder per class, a Parquet export.

A source lists its records cheaply (ids and labels) and decodes each image only when asked, so the
split can be planned before any pixel work and a bad file surfaces as BadImageError naming it. The
built-in shapes and a Parquet export list their records lazily (a record is made when indexed), so a
million-image source costs its label array, not a million Python objects.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from components.data.config import PrepareConfig, ShapesConfig
from components.data.glyphs import glyphs_source
from components.data.images import DataError
from components.data.records import IMAGE_EXTENSIONS, UNLABELLED, LazyRecords, Record, Source

__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "UNLABELLED", "LazyRecords", "Record", "Source", "open_source"]


# --- builtin:digits -------------------------------------------------------------------------------
def digits_source(cfg: PrepareConfig) -> Source:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16, no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    records = [
        Record(
            id=f"digits-{i:05d}", label=int(y), origin=f"digits-{i:05d}", image=Image.fromarray(x, mode="L")
        )
        for i, (x, y) in enumerate(zip(pixels, digits.target, strict=True))
    ]
    return Source(class_names=tuple(str(int(n)) for n in digits.target_names), records=records)


# --- builtin:shapes -------------------------------------------------------------------------------
FIXED_COLOURS = ((230, 60, 60), (60, 200, 80), (70, 110, 240), (240, 200, 40), (200, 70, 220), (40, 210, 220))
SUPERSAMPLE = 4  # draw at 4x and box-reduce: PIL's polygons are not anti-aliased


def _polygon(name: str, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius r around the origin (before rotation)."""
    if name == "square":
        a = r / math.sqrt(2)
        return [(-a, -a), (a, -a), (a, a), (-a, a)]
    if name == "triangle":
        return [(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if name == "diamond":
        return [(0, -r), (0.55 * r, 0), (0, r), (-0.55 * r, 0)]
    if name == "cross":
        w = r / 3
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                (-r, -w), (-w, -w)]  # fmt: skip
    raise ValueError(f"{name!r} is not a polygon shape")


def draw_shape(*, name: str, index: int, label: int, shapes: ShapesConfig, seed: int) -> Image.Image:
    """One RGBA shape on a transparent canvas; position, scale, rotation and colour from (seed, index)."""
    rng = np.random.default_rng([seed, index])
    s = shapes.size * SUPERSAMPLE
    r = rng.uniform(0.22, 0.42) * s
    cx, cy = rng.uniform(r, s - r, size=2)
    theta = rng.uniform(0, 2 * math.pi)
    if shapes.colors == "fixed":
        colour = FIXED_COLOURS[label % len(FIXED_COLOURS)]
    else:  # a saturated colour: one channel full, one low, one anywhere (never near grey or white)
        hi, lo, mid = rng.permutation(3)
        rgb = [0, 0, 0]
        rgb[hi], rgb[lo], rgb[mid] = 255, int(rng.integers(0, 120)), int(rng.integers(0, 256))
        colour = tuple(rgb)
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    if name in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(
            box,
            fill=colour + (255,) if name == "circle" else None,
            outline=colour + (255,),
            width=0 if name == "circle" else max(1, round(r / 3)),
        )
    else:
        c, sn = math.cos(theta), math.sin(theta)
        pts = [(cx + x * c - y * sn, cy + x * sn + y * c) for x, y in _polygon(name, r)]
        draw.polygon(pts, fill=colour + (255,))
    return img.reduce(SUPERSAMPLE)


def _shape_record(i: int, *, cfg: PrepareConfig) -> Record:
    names = cfg.shapes.classes
    label = i % len(names)
    make = partial(draw_shape, name=names[label], index=i, label=label, shapes=cfg.shapes, seed=cfg.seed)
    return Record(id=f"shapes-{i:05d}", label=label, origin=f"shapes-{i:05d}", make=make)


def shapes_source(cfg: PrepareConfig) -> Source:
    """Procedural shapes, balanced classes (label = index mod K), deterministic in cfg.seed, any count.

    Each image depends on (seed, index) alone and is drawn only when its record is opened.
    """
    n, k = cfg.shapes.count, len(cfg.shapes.classes)
    return Source(
        class_names=tuple(cfg.shapes.classes),
        records=LazyRecords(n, partial(_shape_record, cfg=cfg)),
        labels=np.arange(n, dtype=np.int64) % k,
        unique_ids=True,
    )


# --- imagefolder:PATH -----------------------------------------------------------------------------
def _existing(path: str, *, source: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"source={source!r}: {p} does not exist")
    return p


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")  # .DS_Store, editor swap files: not part of the data


def imagefolder_source(cfg: PrepareConfig) -> Source:
    """One subfolder per class (sorted names = class names); files found recursively in each."""
    root = _existing(cfg.source_path, source=cfg.source)
    if not root.is_dir():
        raise DataError(f"source={cfg.source!r}: {root} is not a directory")
    try:
        entries = sorted(p for p in root.iterdir() if _visible(p))
    except OSError as err:
        raise DataError(f"source={cfg.source!r}: cannot list {root} ({err.strerror})") from None
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise DataError(f"{stray[0]}: files must sit in one subfolder per class under {root}")
    if not entries:
        raise DataError(f"source={cfg.source!r}: {root} has no class subfolders")
    records = []
    for label, folder in enumerate(entries):
        try:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p))
        except OSError as err:
            raise DataError(f"cannot list class folder {folder} ({err.strerror})") from None
        if not files:
            raise DataError(f"class folder {folder} is empty")
        for f in files:
            rel = f.relative_to(root).as_posix()
            records.append(Record(id=rel, label=label, origin=str(f), file=f))
    return Source(class_names=tuple(p.name for p in entries), records=records)


# --- parquet:PATH ---------------------------------------------------------------------------------
def _parquet_files(cfg: PrepareConfig) -> list[Path]:
    p = _existing(cfg.source_path, source=cfg.source)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*.parquet") if _visible(f))
    if not files:
        raise DataError(f"source={cfg.source!r}: no .parquet files under {p}")
    return files


def _hf_label_names(schema: pa.Schema, column: str) -> tuple[str, ...] | None:
    """ClassLabel names from the `huggingface` schema metadata (info.features.<column>.names)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return tuple(str(n) for n in names) if names else None


def _check_columns(path: Path, schema: pa.Schema, cfg: PrepareConfig) -> None:
    wanted = {"image_column": cfg.parquet.image_column, "label_column": cfg.parquet.label_column}
    for key, col in wanted.items():
        if col is not None and col not in schema.names:
            raise DataError(
                f"{path}: column {col!r} (prepare.parquet.{key}) not found; columns: {schema.names}"
            )
    t = schema.field(cfg.parquet.image_column).type
    ok = pa.types.is_binary(t) or pa.types.is_large_binary(t)
    if not ok and not (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0):
        raise DataError(
            f"{path}: image column {cfg.parquet.image_column!r} has type {t}; "
            f"expected binary or struct<bytes, path>"
        )
    if cfg.parquet.label_column is not None and not pa.types.is_integer(
        schema.field(cfg.parquet.label_column).type
    ):
        raise DataError(
            f"{path}: label column {cfg.parquet.label_column!r} has type "
            f"{schema.field(cfg.parquet.label_column).type}; expected integers"
        )


def _image_bytes(column: pa.ChunkedArray) -> pa.Array:
    """The image column's bytes as one Arrow array (Arrow buffers: about the column's size on disk)."""
    if pa.types.is_struct(column.type):
        column = pa.chunked_array(
            [c.field("bytes") for c in column.chunks], type=column.type.field("bytes").type
        )
    return column.combine_chunks()


class _ParquetRecords(LazyRecords):
    """Records over the files' image columns, kept as Arrow arrays; a row's bytes copied when indexed."""

    def __init__(self, parts: list[tuple[Path, pa.Array, np.ndarray]]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p[1]) for p in parts]).tolist()
        super().__init__(self.starts[-1], self._record)

    def _record(self, i: int) -> Record:
        f = bisect.bisect_right(self.starts, i) - 1
        path, images, labels = self.parts[f]
        row = i - self.starts[f]
        return Record(
            id=f"{path.stem}-{row:06d}",
            label=int(labels[row]),
            origin=f"{path}#row={row}",
            data=images[row].as_py(),
        )


def parquet_source(cfg: PrepareConfig) -> Source:
    """A Hugging Face-style export: image as struct{bytes, path} or binary, an integer label column."""
    files = _parquet_files(cfg)
    label_col = cfg.parquet.label_column
    names = cfg.parquet.label_names
    parts: list[tuple[Path, pa.Array, np.ndarray]] = []
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        _check_columns(path, schema, cfg)
        if names is None and label_col is not None:
            names = _hf_label_names(schema, label_col)
        cols = [cfg.parquet.image_column] + ([label_col] if label_col else [])
        table = pq.read_table(path, columns=cols)
        images = _image_bytes(table.column(cfg.parquet.image_column))
        if label_col:
            column = table.column(label_col)
            if column.null_count:
                row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{path}#row={row}: label column {label_col!r} is null")
            labels = column.to_numpy().astype(np.int64)
        else:
            labels = np.full(len(images), UNLABELLED, dtype=np.int64)
        parts.append((path, images, labels))
    records = _ParquetRecords(parts)
    all_labels = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    if label_col is None:
        return Source(class_names=(), records=records, labels=all_labels)
    top = int(all_labels.max()) if len(all_labels) else -1
    class_names = tuple(names) if names is not None else tuple(str(k) for k in range(top + 1))
    bad = np.flatnonzero((all_labels < 0) | (all_labels >= len(class_names)))
    if len(bad):
        rec = records[int(bad[0])]
        raise DataError(
            f"{rec.origin}: label {rec.label} outside 0..{len(class_names) - 1} "
            f"({len(class_names)} class names)"
        )
    return Source(class_names=class_names, records=records, labels=all_labels)


SOURCES: dict[str, Callable[[PrepareConfig], Source]] = {
    "builtin:digits": digits_source,
    "builtin:shapes": shapes_source,
    "builtin:glyphs": glyphs_source,
    "imagefolder": imagefolder_source,
    "parquet": parquet_source,
}


def open_source(cfg: PrepareConfig) -> Source:
    """The source named by cfg.source (an explicit kind -> reader dict)."""
    if cfg.source_kind not in SOURCES:
        raise DataError(f"source={cfg.source!r}: unknown kind {cfg.source_kind!r}; valid: {list(SOURCES)}")
    return SOURCES[cfg.source_kind](cfg)
