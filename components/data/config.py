"""Configs of the data sources and of the prepared image format."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from components.schema import StrictConfig

SOURCE_KINDS = ("builtin:digits", "builtin:shapes", "imagefolder:PATH", "parquet:PATH")
SHAPE_NAMES = ("circle", "square", "triangle", "cross", "diamond", "ring")


class ShapesConfig(StrictConfig):
    """The procedural shapes set (`builtin:shapes`)."""

    count: int = Field(default=2000, gt=0)
    classes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    size: int = Field(default=32, ge=8, le=512, description="canvas size before the prepare resize")
    colors: Literal["random", "fixed"] = "random"

    @field_validator("classes")
    @classmethod
    def _known_shapes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in v if s not in SHAPE_NAMES]
        if bad or len(set(v)) != len(v) or len(v) < 2:
            raise ValueError(f"classes must be 2+ distinct names from {list(SHAPE_NAMES)}, got {list(v)}")
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
    parquet: ParquetSourceConfig = ParquetSourceConfig()

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in ("builtin:digits", "builtin:shapes") or re.fullmatch(r"(imagefolder|parquet):.+", v):
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
