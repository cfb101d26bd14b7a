"""Sample sets on disk: what `genpipe evaluate --samples PATH` reads and `--dump-samples` writes.

The contract (docs/contracts.md, "Sample sets"):
- `.npz`: `images` (N, C, H, W) and, optionally, `labels` (N,) of an integer dtype: the class each image
  was asked for, in 0..num_classes-1. No other arrays. `.npy`: `images` alone (unconditional).
- `images` dtype decides the scale: uint8 is 0..255 (mapped to x / 127.5 - 1, as prepare decodes
  PNGs); float32 or float64 is already in [-1, 1] (what generators return). Nothing else.
- An image folder: PNG files, either all at its top level (unconditional) or in one subfolder per
  class, named by the class's name in data/processed/meta.json or its index; 8-bit L or RGB.
C, H and W must be the prepared data's channels and image size. Arrays are read in batches (a `.npy`
and each `.npz` member are streamed from their file), so a set of any size costs one batch.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from numpy.lib import format as npy
from PIL import Image

IMAGE_SUFFIXES = (".png",)
DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))
ARRAYS = ("images", "labels")


class SampleSetError(ValueError):
    """A sample set that breaks the contract; the message is one line naming the file."""


class SampleSet:
    """A validated sample set: `n` images of `shape`, the `labels` asked for (or None), and `batches()`."""

    def __init__(
        self,
        path: str | Path,
        *,
        channels: int,
        size: int,
        num_classes: int,
        class_names: tuple[str, ...] = (),
    ) -> None:
        self.path = Path(path)
        self.shape = (channels, size, size)
        if not self.path.exists():
            raise SampleSetError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            self.files, self.labels = _folder(
                self.path, num_classes=num_classes, class_names=tuple(class_names)
            )
            self.n, self.dtype = len(self.files), np.dtype(np.uint8)
        elif self.path.suffix in (".npy", ".npz"):
            self._read_header()
            self.labels = self._read_labels(num_classes)
        else:
            raise SampleSetError(f"{self.path}: not a .npy, .npz or image folder")

    def _read_header(self) -> None:
        with self._images_stream() as fp:
            shape, dtype = _header(fp, where=self._where("images"))
        if len(shape) != 4 or tuple(shape[1:]) != self.shape:
            hint = ""
            if len(shape) == 4 and (shape[3], shape[1], shape[2]) == self.shape:
                hint = "; it looks like (N, H, W, C): transpose it with x.transpose(0, 3, 1, 2)"
            raise SampleSetError(
                f"{self._where('images')} has shape {tuple(shape)}, expected (N, {', '.join(map(str, self.shape))})"
                f" (N, C, H, W) for the prepared data{hint}"
            )
        if dtype not in DTYPES:
            raise SampleSetError(
                f"{self._where('images')} has dtype {dtype}: use uint8 (0..255) or float32/float64 (in [-1, 1])"
            )
        self.n, self.dtype = int(shape[0]), dtype

    def _where(self, array: str) -> str:
        return f"{self.path}[{array!r}]" if self.path.suffix == ".npz" else str(self.path)

    @contextlib.contextmanager
    def _images_stream(self) -> Iterator[BinaryIO]:
        """The raw `.npy` bytes of the images: the file itself, or the `.npz` member, opened for streaming."""
        if self.path.suffix == ".npy":
            with self.path.open("rb") as fp:
                yield fp
            return
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = sorted(n.removesuffix(".npy") for n in zf.namelist())
                extra = sorted(set(names) - set(ARRAYS))
                if "images" not in names or extra:
                    raise SampleSetError(
                        f"{self.path} holds arrays {names}: expected 'images' (N, C, H, W) and optionally "
                        "'labels' (N,), nothing else"
                    )
                with zf.open("images.npy") as fp:
                    yield fp
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise SampleSetError(f"{self.path}: not a readable .npz ({err})") from None

    def _read_labels(self, num_classes: int) -> torch.Tensor | None:
        if self.path.suffix == ".npy":
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if "labels" not in z.files:
                    return None
                labels = z["labels"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise SampleSetError(
                f"{self._where('labels')}: unreadable ({str(err).splitlines()[0]})"
            ) from None
        return _check_labels(labels, n=self.n, num_classes=num_classes, where=self._where("labels"))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(images (B, C, H, W) float32 in [-1, 1] by the dtype's scale, labels (B,) int64 or None)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not self.path.is_dir():
            yield from self._array_batches(batch_size)
            return
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            x = np.stack([self._decode(f) for f in self.files[start:stop]])  # (B, C, H, W) uint8
            yield _scale(x), self._labels(start, stop)

    def _labels(self, start: int, stop: int) -> torch.Tensor | None:
        return self.labels[start:stop] if self.labels is not None else None

    def _array_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        per_image = int(np.prod(self.shape)) * self.dtype.itemsize
        with self._images_stream() as fp:
            _header(fp, where=self._where("images"))
            for start in range(0, self.n, batch_size):
                stop = min(start + batch_size, self.n)
                raw = fp.read((stop - start) * per_image)
                if len(raw) != (stop - start) * per_image:
                    raise SampleSetError(
                        f"{self._where('images')}: truncated at image {start + len(raw) // per_image} of {self.n}"
                    )
                x = np.frombuffer(raw, dtype=self.dtype).reshape(stop - start, *self.shape)
                yield _scale(x), self._labels(start, stop)

    def _decode(self, path: Path) -> np.ndarray:
        mode = {1: "L", 3: "RGB"}[self.shape[0]]
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode != mode or img.size != self.shape[1:]:
                    raise SampleSetError(
                        f"{path}: {img.mode} {img.size[0]}x{img.size[1]}, expected {mode} "
                        f"{self.shape[1]}x{self.shape[2]} as the prepared data"
                    )
                x = np.asarray(img, dtype=np.uint8)
        except (OSError, Image.DecompressionBombError) as err:
            raise SampleSetError(f"{path}: not a readable image ({str(err).splitlines()[0]})") from None
        return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # (C, H, W)


def _header(fp: BinaryIO, *, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a `.npy` header (format 1.0 or 2.0); Fortran order and objects refused."""
    try:
        version = npy.read_magic(fp)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read is None:
            raise SampleSetError(f"{where}: .npy format {version} not supported (write it with numpy.save)")
        shape, fortran, dtype = read(fp)
    except (ValueError, EOFError) as err:
        if isinstance(err, SampleSetError):
            raise
        raise SampleSetError(f"{where}: not a .npy array ({str(err).splitlines()[0]})") from None
    if fortran and len(shape) > 1:
        raise SampleSetError(f"{where}: Fortran-ordered; save np.ascontiguousarray(x) instead")
    if dtype.hasobject:
        raise SampleSetError(f"{where}: holds Python objects (dtype {dtype}); use a numeric dtype")
    return tuple(shape), dtype


def _scale(x: np.ndarray) -> torch.Tensor:
    """uint8 0..255 -> x / 127.5 - 1 (as prepare decodes PNGs); floats as they are, in float32."""
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _check_labels(labels: np.ndarray, *, n: int, num_classes: int, where: str) -> torch.Tensor:
    if labels.dtype.kind not in "iu":
        raise SampleSetError(f"{where} has dtype {labels.dtype}: labels must be integers (class indices)")
    if labels.shape != (n,):
        raise SampleSetError(f"{where} has shape {labels.shape}, expected ({n},): one label per image")
    if num_classes < 1:
        raise SampleSetError(f"{where}: the prepared data has no classes, so a sample set has no labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise SampleSetError(
            f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside 0..{num_classes - 1}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _folder(
    root: Path, *, num_classes: int, class_names: tuple[str, ...] = ()
) -> tuple[list[Path], torch.Tensor | None]:
    """Image files in a stable order and their labels: subfolders are classes, loose files unlabelled."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file()]
    _only_images(loose)
    if subdirs and loose:
        raise SampleSetError(
            f"{root}: has both images ({loose[0].name}) and class folders ({subdirs[0].name})"
        )
    if not subdirs:
        if not loose:
            raise SampleSetError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images")
        return loose, None
    files, labels = [], []
    for d in subdirs:
        label = _class_index(d.name, num_classes=num_classes, class_names=class_names, where=str(d))
        found = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        _only_images(found)
        files += found
        labels += [label] * len(found)
    if not files:
        raise SampleSetError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images in its class folders")
    return files, torch.tensor(labels, dtype=torch.int64)


def _only_images(files: list[Path]) -> None:
    other = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if other:
        raise SampleSetError(
            f"{other[0]}: not a {'/'.join(IMAGE_SUFFIXES)} file (a sample folder holds images only)"
        )


def _class_index(name: str, *, num_classes: int, class_names: tuple[str, ...], where: str) -> int:
    if name in class_names:
        return class_names.index(name)
    if name.isdigit() and int(name) < num_classes:
        return int(name)
    named = f" or one of {list(class_names)}" if class_names else ""
    raise SampleSetError(
        f"{where}: not a class: name a class folder by its index 0..{num_classes - 1}{named}"
    )


class SampleWriter:
    """Streams a sample set into `.npz` (images float32 (N, C, H, W), labels int64 (N,)); temp, then rename."""

    def __init__(self, path: str | Path, *, n: int, shape: tuple[int, ...], labels: bool) -> None:
        self.path = Path(path)
        if self.path.suffix != ".npz":
            raise SampleSetError(f"{self.path}: a sample dump is a .npz file")
        self.n, self.shape, self.with_labels = n, tuple(shape), labels
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.written, self.labels = 0, []

    def __enter__(self) -> SampleWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zip.open("images.npy", "w", force_zip64=True)
        header = {
            "descr": npy.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": (self.n, *self.shape),
        }
        npy.write_array_header_2_0(self.member, header)
        return self

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Append a batch (B, C, H, W) and the labels asked for."""
        if tuple(images.shape[1:]) != self.shape or self.written + images.shape[0] > self.n:
            raise ValueError(f"batch {tuple(images.shape)} does not fit a dump of {self.n} x {self.shape}")
        if self.with_labels != (labels is not None):
            raise ValueError("every batch of a dump has labels, or none does")
        self.member.write(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        if labels is not None:
            self.labels.append(labels.detach().cpu().to(torch.int64).numpy())
        self.written += images.shape[0]

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.member.close()
            if kind is None and self.written != self.n:
                raise ValueError(f"dump has {self.written} of {self.n} images")
            if kind is None and self.with_labels:
                buf = io.BytesIO()
                np.save(buf, np.concatenate(self.labels) if self.labels else np.empty(0, np.int64))
                self.zip.writestr("labels.npy", buf.getvalue())
            self.zip.close()
            if kind is None:
                self.tmp.replace(self.path)
        finally:
            self.zip.close()  # idempotent: closes it on the error paths
            self.tmp.unlink(missing_ok=True)
