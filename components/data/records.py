"""The record types every source yields: Record (one image, decoded on demand), LazyRecords, Source."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.images import BadImageError, decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
UNLABELLED = -1


@dataclass(frozen=True)
class Record:
    """One input image: a unique id, its label, where it came from, and how to get its pixels."""

    id: str
    label: int
    origin: str  # the file (or file#row) named in errors and in meta.json's skipped list
    image: Image.Image | None = None
    data: bytes | None = None
    file: Path | None = None
    make: Callable[[], Image.Image] | None = None

    def open(self) -> Image.Image:
        """The decoded image; BadImageError naming `origin` when it cannot be used."""
        if self.image is not None:
            return self.image
        if self.make is not None:
            return self.make()
        if self.file is not None:
            return _read_file(self.file)
        if self.data is None:
            raise BadImageError(self.origin, "no image bytes")
        return decode_image(self.data, path=self.origin)


class LazyRecords(Sequence):
    """`n` records made on demand by `make(index)`: a source listed without holding its records."""

    def __init__(self, n: int, make: Callable[[int], Record]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # an int index (numpy ints too) or a slice
        if isinstance(i, slice):
            return [self.make(j) for j in range(*i.indices(self.n))]
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"record {i} of {self.n}")
        return self.make(i % self.n)


@dataclass(frozen=True)
class Source:
    """Class names (index = label; empty when unlabelled) and the records in a stable order.

    `labels` (N,) int, when given, equals the records' labels without making them; `unique_ids`: the
    ids are distinct by construction (no need to check them).
    """

    class_names: tuple[str, ...]
    records: Sequence[Record]
    labels: np.ndarray | None = None
    unique_ids: bool = False

    def label_array(self) -> np.ndarray:
        """(N,) int64 labels in record order."""
        if self.labels is not None:
            return np.asarray(self.labels, dtype=np.int64)
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self.records))


def _read_file(path: Path) -> Image.Image:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise BadImageError(
            str(path),
            f"not an image file (extension {path.suffix or 'none'!r}; "
            f"allowed: {', '.join(IMAGE_EXTENSIONS)})",
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadImageError(str(path), f"unreadable ({type(err).__name__}: {err.strerror})") from None
    return decode_image(data, path=str(path))
