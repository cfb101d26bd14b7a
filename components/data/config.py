"""Configs of the data sources and of the prepared image format."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from components.schema import StrictConfig

SOURCE_KINDS = ("builtin:digits", "builtin:shapes", "builtin:glyphs", "imagefolder:PATH", "parquet:PATH")
BUILTINS = ("builtin:digits", "builtin:shapes", "builtin:glyphs")
SHAPE_NAMES = ("circle", "square", "triangle", "cross", "diamond", "ring")
#: The TrueType faces in matplotlib's wheel (mpl-data/fonts/ttf) that `builtin:glyphs` draws with.
GLYPH_FONTS = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-oblique": "DejaVuSans-Oblique.ttf",
    "sans-bold-oblique": "DejaVuSans-BoldOblique.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "serif-bold-italic": "DejaVuSerif-BoldItalic.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
    "mono-oblique": "DejaVuSansMono-Oblique.ttf",
    "mono-bold-oblique": "DejaVuSansMono-BoldOblique.ttf",
    "stix": "STIXGeneral.ttf",
    "stix-bold": "STIXGeneralBol.ttf",
    "stix-italic": "STIXGeneralItalic.ttf",
    "stix-bold-italic": "STIXGeneralBolIta.ttf",
}
GLYPH_BACKGROUNDS = ("solid", "gradient", "noise", "stripes", "checker")
# 24 glyphs that stay distinct under +-25 degrees of rotation in every face (no I/l/1, O/0, M/W).
GLYPH_CLASSES = tuple("ABCDEFGHKLMNPRSTUVXYZ") + ("&", "?", "#")


def _distinct(
    v: tuple[str, ...], field: str, *, least: int, allowed: tuple[str, ...] = (), what: str = ""
) -> tuple[str, ...]:
    """`v` holds at least `least` distinct values, each in `allowed` (else a printable character)."""
    ok = (lambda x: x in allowed) if allowed else (lambda x: len(x) == 1 and "!" <= x <= "~")
    if [x for x in v if not ok(x)] or len(set(v)) != len(v) or len(v) < least:
        kind = f"names from {list(allowed)}" if allowed else what
        raise ValueError(f"{field} must be {least}+ distinct {kind}, got {list(v)}")
    return v


class ShapesConfig(StrictConfig):
    """The procedural shapes set (`builtin:shapes`)."""

    count: int = Field(default=2000, gt=0)
    classes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    size: int = Field(default=32, ge=8, le=512, description="canvas size before the prepare resize")
    colors: Literal["random", "fixed"] = "random"

    @field_validator("classes")
    @classmethod
    def _known_shapes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _distinct(v, "classes", least=2, allowed=SHAPE_NAMES)


class GlyphsConfig(StrictConfig):
    """The procedural glyph set (`builtin:glyphs`): one class per character, in many faces and colours."""

    count: int = Field(default=4800, gt=0)
    classes: tuple[str, ...] = GLYPH_CLASSES
    fonts: tuple[str, ...] = tuple(GLYPH_FONTS)
    backgrounds: tuple[str, ...] = GLYPH_BACKGROUNDS
    size: int = Field(default=32, ge=8, le=512, description="canvas size before the prepare resize")
    scale: tuple[float, float] = (0.5, 0.9)  # the glyph's longer side over the canvas side
    rotation: float = Field(default=25.0, ge=0, le=180)  # degrees, uniform in [-rotation, rotation]

    @field_validator("classes")
    @classmethod
    def _printable(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _distinct(v, "classes", least=2, what="single printable ASCII characters (not space)")

    @field_validator("fonts")
    @classmethod
    def _known_fonts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _distinct(v, "fonts", least=1, allowed=tuple(GLYPH_FONTS))

    @field_validator("backgrounds")
    @classmethod
    def _known_backgrounds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _distinct(v, "backgrounds", least=1, allowed=GLYPH_BACKGROUNDS)

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.2 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"scale={list(v)} must be [low, high] with 0.2 <= low <= high <= 1")
        return v


class ParquetSourceConfig(StrictConfig):
    """Column names of a Hugging Face-style image export (`parquet:PATH`)."""

    image_column: str = "image"  # struct {bytes, path} or raw bytes
    label_column: str | None = "label"  # None: unlabelled
    label_names: tuple[str, ...] | None = None  # else from the file's HF metadata, else "0".."K-1"


class SplitConfig(StrictConfig):
    val: float = Field(default=0.1, ge=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitConfig:
        if self.val + self.test >= 0.9:
            raise ValueError(f"val+test={self.val + self.test:.2f} leaves under 10% for train")
        return self


class PrepareConfig(StrictConfig):
    """The `prepare` section."""

    source: str = "builtin:digits"
    image_size: int = Field(default=16, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    aspect: Literal["center_crop", "pad", "stretch"] = "center_crop"
    background: tuple[int, int, int] = (0, 0, 0)  # composited under transparency, and the pad colour
    split: SplitConfig = SplitConfig()
    seed: int = Field(default=0, ge=0)
    shard_rows: int = Field(default=4096, gt=0)
    on_bad_image: Literal["error", "skip"] = "error"
    min_per_class: int = Field(default=3, ge=1)
    shapes: ShapesConfig = ShapesConfig()
    glyphs: GlyphsConfig = GlyphsConfig()
    parquet: ParquetSourceConfig = ParquetSourceConfig()
    # The path dvc.yaml's prepare stage depends on (`${prepare.dvc_dep}`): an imagefolder:/parquet:
    # source's PATH, so that DVC re-runs prepare when its files change; the built-ins' code otherwise.
    dvc_dep: str = Field(default="components/data", min_length=1)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in BUILTINS or re.fullmatch(r"(imagefolder|parquet):.+", v):
            return v
        raise ValueError(f"source={v!r} is not one of {list(SOURCE_KINDS)}")

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError(f"background={list(v)} must be three values in 0..255")
        return v

    @property
    def source_kind(self) -> str:
        return self.source.split(":", 1)[0] if not self.source.startswith("builtin:") else self.source

    @property
    def source_path(self) -> str | None:
        kind, _, rest = self.source.partition(":")
        return rest if kind in ("imagefolder", "parquet") else None
