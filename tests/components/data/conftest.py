"""Fixtures for the data layer: real image files in odd modes, image folders, Parquet exports."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data.config import PrepareConfig


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_images() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, what it is): one file per awkward mode/format the sources must accept."""
    rgba = Image.new("RGBA", (12, 10), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 6, 10))  # left half transparent
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(0, (0, 0, 5, 10))
    la = Image.new("LA", (10, 10), (200, 255))
    la.paste((0, 0), (0, 0, 5, 10))
    wide = Image.fromarray((np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16))
    return {
        "grey.png": (png_bytes(Image.new("L", (9, 11), 128)), "L"),
        "grey_alpha.png": (png_bytes(la), "LA"),
        "palette_trns.png": (png_bytes(pal, transparency=0), "P with transparency"),
        "rgba.png": (png_bytes(rgba), "RGBA"),
        "cmyk.jpg": (png_bytes(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "JPEG"), "CMYK JPEG"),
        "deep.png": (png_bytes(wide), "I;16"),
        "bilevel.bmp": (png_bytes(Image.new("1", (8, 8), 1), "BMP"), "1-bit BMP"),
        "anim.gif": (png_bytes(pal, "GIF", transparency=0), "GIF with transparency"),
        "alpha.webp": (png_bytes(rgba, "WEBP", lossless=True), "RGBA WebP"),
        "UPPER.JPEG": (
            png_bytes(Image.new("RGB", (20, 8), (10, 20, 30)), "JPEG"),
            "RGB JPEG, upper-case ext",
        ),
    }


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[[dict[str, dict[str, bytes]]], Path]:
    """{class: {file name: bytes}} -> an image folder under tmp_path."""

    def make(classes: dict[str, dict[str, bytes]], name: str = "folder") -> Path:
        root = tmp_path / name
        root.mkdir()
        for cls, files in classes.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            for fname, data in files.items():
                (root / cls / fname).write_bytes(data)
        return root

    return make


@pytest.fixture
def good_folder(make_folder) -> Path:
    """Two classes of four small solid-colour PNGs each."""
    colours = {"cat": (200, 50, 50), "dog": (50, 50, 200)}
    return make_folder(
        {
            c: {
                f"{i}.png": png_bytes(Image.new("RGB", (10, 10), tuple(v + i for v in rgb))) for i in range(4)
            }
            for c, rgb in colours.items()
        }
    )


def write_parquet(
    path: Path, *, images: list[bytes], labels: list[int] | None, struct: bool, names: list[str] | None = None
) -> Path:
    """A Hugging Face-style export: image struct{bytes, path} or binary, optional ClassLabel metadata."""
    if struct:
        image = pa.array(
            [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        image = pa.array(images, pa.binary())
    cols = {"image": image}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    table = pa.table(cols)
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture
def tiny_shapes() -> PrepareConfig:
    """40 shapes, 4 classes, 8x8 RGB: a build takes well under a second."""
    return PrepareConfig(source="builtin:shapes", channels=3, image_size=8, shapes={"count": 40, "size": 16})


def snapshot(path: Path) -> dict[str, str]:
    """relative file -> sha256, to show a directory was left untouched."""
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The helper functions above, as a fixture (importing conftest depends on pytest's import mode)."""
    return SimpleNamespace(
        png_bytes=png_bytes,
        odd_images=odd_images,
        write_parquet=write_parquet,
        snapshot=snapshot,
        leftovers=leftovers,
    )
