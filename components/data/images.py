"""Image decoding and standardisation: any file mode -> L or RGB, one size, PNG bytes, [-1, 1] arrays.

Every prepared image goes through `standardize` once, so later stages see one format: `channels`
(1 -> L, 3 -> RGB), `image_size` square, transparency composited onto the configured background.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.data.config import PrepareConfig

#: Modes PIL opens 16/32-bit grey images in (16-bit PNG: "I;16" or "I"); scaled by 1/257 to 8 bits.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: Modes carrying alpha (or a transparency key in `info`) that are composited onto the background.
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
#: Modes PIL converts to RGB directly.
COLOUR_MODES = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
CHANNEL_MODES = {1: "L", 3: "RGB"}
#: Leading bytes of PNG, JPEG, GIF, BMP and WebP (RIFF): an unparsable file that has one is corrupt.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


class DataError(ValueError):
    """Bad input data or a bad prepared-data directory; the message is one line naming the culprit."""


class BadImageError(DataError):
    """One input image that cannot be used (empty, corrupt, not an image)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"bad image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def decode_image(data: bytes, *, path: str) -> Image.Image:
    """Bytes -> fully loaded PIL image (first frame of an animation); BadImageError if unusable."""
    if not data:
        raise BadImageError(path, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now so truncation fails here, not later
    except UnidentifiedImageError:
        if data.startswith(IMAGE_MAGIC):
            raise BadImageError(path, "corrupt or truncated image (header not readable)") from None
        raise BadImageError(path, "not an image (format not recognised)") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as err:
        raise BadImageError(path, f"corrupt or truncated image ({_first_line(err)})") from None
    return img


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int holding 16-bit) grey -> 8-bit L by v/257 (65535 -> 255)."""
    v = np.asarray(img, dtype=np.float64)
    v = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(v, mode="L")


def to_channels(img: Image.Image, *, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> L (channels=1) or RGB (channels=3), transparency composited onto background."""
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels={channels} is not one of {list(CHANNEL_MODES)}")
    mode = img.mode
    if mode in WIDE_GREY_MODES:
        img = _wide_grey_to_l(img)
    elif mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode="L")
    elif mode == "1":
        img = img.convert("L")
    if img.mode in ("P", "PA") or img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # applies palette alpha and tRNS colour keys
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
    elif img.mode in COLOUR_MODES:
        img = img.convert("RGB")
    elif img.mode != "L":
        raise ValueError(f"image mode {img.mode!r} is not supported")
    return img.convert(CHANNEL_MODES[channels])


def _fill(mode: str, background: tuple[int, int, int]) -> int | tuple[int, int, int]:
    """The background as a fill value of `mode` (L uses the same luma PIL uses for RGB -> L)."""
    return Image.new("RGB", (1, 1), background).convert(mode).getpixel((0, 0))


def fit_size(img: Image.Image, *, size: int, aspect: str, background: tuple[int, int, int]) -> Image.Image:
    """Resize to size x size: center_crop (cover, crop the middle), pad (fit, centre) or stretch."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect={aspect!r} is not one of {list(ASPECTS)}")
    if img.size == (size, size):
        return img
    return ASPECTS[aspect](img, size=size, background=background)


def _resample(src: tuple[int, int], dst: tuple[float, float]) -> Image.Resampling:
    # Lanczos anti-aliases when shrinking; bicubic is smooth without ringing halos when enlarging.
    shrinks = dst[0] < src[0] or dst[1] < src[1]
    return Image.Resampling.LANCZOS if shrinks else Image.Resampling.BICUBIC


def _center_crop(img: Image.Image, *, size: int, background: tuple[int, int, int]) -> Image.Image:
    m = min(img.size)  # crop the central square first, so no pixel outside it bleeds in
    left, top = (img.width - m) // 2, (img.height - m) // 2
    img = img.crop((left, top, left + m, top + m))
    return img if m == size else img.resize((size, size), _resample(img.size, (size, size)))


def _pad(img: Image.Image, *, size: int, background: tuple[int, int, int]) -> Image.Image:
    s = size / max(img.size)
    method = _resample(img.size, (img.width * s, img.height * s))
    return ImageOps.pad(img, (size, size), method=method, color=_fill(img.mode, background))


def _stretch(img: Image.Image, *, size: int, background: tuple[int, int, int]) -> Image.Image:
    return img.resize((size, size), _resample(img.size, (size, size)))


ASPECTS = {"center_crop": _center_crop, "pad": _pad, "stretch": _stretch}


def standardize(img: Image.Image, *, cfg: PrepareConfig) -> Image.Image:
    """Any image -> the prepared format of `cfg` (mode from channels, image_size square, aspect)."""
    img = to_channels(img, channels=cfg.channels, background=cfg.background)
    return fit_size(img, size=cfg.image_size, aspect=cfg.aspect, background=cfg.background)


def encode_png(img: Image.Image) -> bytes:
    """PIL image -> PNG bytes (lossless; deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_to_array(data: bytes, *, channels: int) -> np.ndarray:
    """Prepared PNG bytes -> float32 (C, H, W) in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != CHANNEL_MODES[channels]:
            raise DataError(f"prepared image has mode {img.mode!r}, expected {CHANNEL_MODES[channels]!r}")
        x = np.asarray(img, dtype=np.uint8)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # (H, W) | (H, W, C) -> (C, H, W)
    return x.astype(np.float32) / 127.5 - 1.0


def pngs_to_array(pngs: Sequence[bytes], *, channels: int, size: int) -> np.ndarray:
    """A batch of prepared PNGs -> float32 (B, C, H, W) in [-1, 1] (B may be 0)."""
    out = np.empty((len(pngs), channels, size, size), dtype=np.float32)
    for i, data in enumerate(pngs):
        out[i] = png_to_array(data, channels=channels)
    return out
