"""builtin:glyphs: characters in many faces, colours, sizes, angles and places, on textured backgrounds.

A 32x32 RGB set with real variety and no download: the TrueType faces inside matplotlib's wheel
(DejaVu Sans/Serif/Mono with their bold and oblique styles, STIX General) render one character per
class. Each image depends on (seed, index) alone, so the set is deterministic, any count, and listed
lazily like builtin:shapes. Drawing is cheap: each (face, character) mask is rendered once per process
at 4x the canvas and cached; an image rotates and shrinks that mask and blends two colours with numpy.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.data.config import GLYPH_FONTS, GlyphsConfig, PrepareConfig
from components.data.images import DataError
from components.data.records import LazyRecords, Record, Source

MASTER = 4  # masks are rendered at MASTER x the canvas, then rotated and reduced (anti-aliasing)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's RGB -> L


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (mpl-data/fonts/ttf)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def class_name(char: str) -> str:
    """A file-system-safe class name: the character itself for letters and digits, else its name."""
    return char if char.isalnum() else unicodedata.name(char).lower().replace(" ", "_").replace("-", "_")


@lru_cache(maxsize=64)
def _face(font: str, px: int) -> ImageFont.FreeTypeFont:
    path = font_dir() / GLYPH_FONTS[font]
    try:
        return ImageFont.truetype(str(path), px)
    except OSError as err:
        raise DataError(f"prepare.glyphs.fonts: cannot load {font!r} from {path} ({err})") from None


@lru_cache(maxsize=4096)
def glyph_mask(font: str, char: str, px: int) -> Image.Image:
    """The character's coverage (L, 0..255) in `font` at `px` pixels per em, cropped to its ink."""
    face = _face(font, px)
    left, top, right, bottom = face.getbbox(char)
    img = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), char, fill=255, font=face)
    box = img.getbbox()
    if box is None:
        raise DataError(f"prepare.glyphs: {char!r} has no ink in font {font!r}")
    return img.crop(box)


def _colour(rng: np.random.Generator, *, dark: bool) -> np.ndarray:
    """A random RGB colour in [0, 1] whose luma is below 0.35 (dark) or above 0.65 (light)."""
    for _ in range(64):
        c = rng.uniform(0, 1, size=3)
        c = c**2 if dark else 1 - (1 - c) ** 2  # lean towards the wanted end
        y = float(c @ LUMA)
        if (y < 0.35) if dark else (y > 0.65):
            return c
    return np.full(3, 0.1 if dark else 0.9)


def _background(kind: str, rng: np.random.Generator, *, size: int) -> tuple[np.ndarray, bool]:
    """(size, size, 3) in [0, 1]: two nearby colours mixed by a texture of `kind`; and whether it is dark."""
    dark = bool(rng.random() < 0.5)
    c1 = _colour(rng, dark=dark)
    c2 = np.clip(c1 + rng.normal(0, 0.12, size=3), 0, 1)  # low contrast: the glyph stays the figure
    yy, xx = np.mgrid[0:size, 0:size] / size
    theta = rng.uniform(0, 2 * np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)  # a coordinate along a random direction
    if kind == "solid":
        t = np.zeros((size, size))
    elif kind == "gradient":
        t = (u - u.min()) / max(np.ptp(u), 1e-9)
    elif kind == "noise":
        cells = int(rng.integers(3, 7))
        low = Image.fromarray(rng.uniform(0, 1, size=(cells, cells)).astype(np.float32), mode="F")
        t = np.asarray(low.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * u + rng.uniform(0, 2 * np.pi))
    elif kind == "checker":
        k = int(rng.integers(max(2, size // 10), max(3, size // 4) + 1))
        t = ((np.arange(size)[:, None] // k + np.arange(size)[None, :] // k) % 2).astype(np.float64)
    else:
        raise ValueError(f"background {kind!r} is not one of solid, gradient, noise, stripes, checker")
    t = np.clip(t, 0, 1)[..., None]
    return (c1 * (1 - t) + c2 * t), dark


def draw_glyph(*, char: str, index: int, glyphs: GlyphsConfig, seed: int) -> Image.Image:
    """One RGB glyph image; face, size, angle, place and colours from (seed, index) alone."""
    rng = np.random.default_rng([seed, index, 7])  # 7: a stream of its own, apart from builtin:shapes
    s = glyphs.size
    font = glyphs.fonts[int(rng.integers(len(glyphs.fonts)))]
    kind = glyphs.backgrounds[int(rng.integers(len(glyphs.backgrounds)))]
    bg, dark = _background(kind, rng, size=s)
    fg = _colour(rng, dark=not dark)
    # the mask: rotate at MASTER scale, then shrink so its longer side is scale * canvas
    mask = glyph_mask(font, char, MASTER * s).rotate(
        float(rng.uniform(-glyphs.rotation, glyphs.rotation)), resample=Image.Resampling.BICUBIC, expand=True
    )
    side = rng.uniform(*glyphs.scale) * s
    f = side / max(mask.size)
    w, h = max(1, min(s, round(mask.width * f))), max(1, min(s, round(mask.height * f)))
    m = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255.0
    x, y = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
    region = bg[y : y + h, x : x + w]
    bg[y : y + h, x : x + w] = region * (1 - m) + fg * m
    return Image.fromarray(np.rint(bg * 255).astype(np.uint8), mode="RGB")


def _glyph_record(i: int, *, cfg: PrepareConfig) -> Record:
    chars = cfg.glyphs.classes
    label = i % len(chars)
    make = partial(draw_glyph, char=chars[label], index=i, glyphs=cfg.glyphs, seed=cfg.seed)
    return Record(id=f"glyphs-{i:05d}", label=label, origin=f"glyphs-{i:05d}", make=make)


def glyphs_source(cfg: PrepareConfig) -> Source:
    """Procedural glyphs, balanced classes (label = index mod K), deterministic in cfg.seed, any count."""
    missing = [f for f in cfg.glyphs.fonts if not (font_dir() / GLYPH_FONTS[f]).is_file()]
    if missing:
        raise DataError(f"prepare.glyphs.fonts: {missing} not found under {font_dir()} (matplotlib's fonts)")
    n, k = cfg.glyphs.count, len(cfg.glyphs.classes)
    return Source(
        class_names=tuple(class_name(c) for c in cfg.glyphs.classes),
        records=LazyRecords(n, partial(_glyph_record, cfg=cfg)),
        labels=np.arange(n, dtype=np.int64) % k,
        unique_ids=True,
    )
