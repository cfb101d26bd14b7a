"""builtin:glyphs: deterministic, balanced, RGB, lazily listed, and its classes tell apart."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from components.config import ParamsError, validate_section
from components.data import glyphs
from components.data.build import build_dataset
from components.data.config import GLYPH_CLASSES, GLYPH_FONTS, PrepareConfig
from components.data.images import DataError
from components.data.sources import SOURCES, open_source

LUMA = np.array([0.299, 0.587, 0.114])


def _cfg(**glyph_params) -> PrepareConfig:
    return PrepareConfig(source="builtin:glyphs", channels=3, image_size=32, glyphs=glyph_params)


def _pixels(cfg: PrepareConfig, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) labels of the first n records."""
    src = open_source(cfg)
    n = len(src.records) if n is None else n
    return np.stack([np.asarray(src.records[i].open()) for i in range(n)]), src.label_array()[:n]


def _ink(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, H*W): each pixel's luma distance from the border's median, scaled to max 1."""
    grey = x.astype(np.float64) @ LUMA
    border = np.concatenate([grey[:, 0], grey[:, -1], grey[:, :, 0], grey[:, :, -1]], axis=1)
    ink = np.abs(grey - np.median(border, axis=1)[:, None, None]).reshape(len(x), -1)
    return ink / np.maximum(ink.max(1, keepdims=True), 1e-9)


def _shape_features(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, 144): the ink cropped to its box and resized to 12x12 (place and size removed)."""
    out = []
    for m in _ink(x).reshape(x.shape[:3]):
        ys, xs = np.nonzero(m > 0.3)
        box = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
        out.append(np.asarray(Image.fromarray(box, mode="F").resize((12, 12), Image.Resampling.BILINEAR)))
    return np.stack(out).reshape(len(x), -1)


def _centroid_accuracy(feats: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Nearest class mean, fitted on the first half and scored on the second."""
    half = np.arange(len(labels)) < len(labels) // 2
    means = np.stack([feats[half & (labels == c)].mean(0) for c in range(k)])
    dist = ((feats[~half, None, :] - means[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == labels[~half]).mean())


def test_registered_with_24_default_classes():
    assert SOURCES["builtin:glyphs"] is glyphs.glyphs_source
    src = open_source(_cfg(count=48))
    assert len(src.class_names) == len(GLYPH_CLASSES) == 24
    assert src.class_names[:2] == ("A", "B") and src.class_names[-3:] == (
        "ampersand",
        "question_mark",
        "number_sign",
    )


def test_balanced_deterministic_seeded_rgb():
    cfg = _cfg(count=60, classes=["A", "B", "&"])
    src = open_source(cfg)
    assert Counter(int(y) for y in src.label_array()) == {0: 20, 1: 20, 2: 20}
    assert [r.label for r in src.records[:4]] == [0, 1, 2, 0] and src.records[5].id == "glyphs-00005"
    img = src.records[7].open()
    assert img.mode == "RGB" and img.size == (32, 32)
    a = np.asarray(img)
    assert a.dtype == np.uint8 and a.std() > 10  # a glyph on a background, not a flat square
    np.testing.assert_array_equal(a, np.asarray(open_source(cfg).records[7].open()))
    assert not np.array_equal(
        a, np.asarray(open_source(cfg.model_copy(update={"seed": 1})).records[7].open())
    )
    assert not np.array_equal(a, np.asarray(src.records[10].open()))  # same class, another draw


def test_every_font_and_background_draws():
    for font in GLYPH_FONTS:
        for bg in ("solid", "gradient", "noise", "stripes", "checker"):
            x, _ = _pixels(_cfg(count=2, fonts=[font], backgrounds=[bg], classes=["G", "#"], size=24))
            assert x.shape == (2, 24, 24, 3)
            assert (_ink(x) > 0.5).sum(1).min() >= 8  # visible ink in every image


def test_the_glyph_contrasts_with_its_background():
    x, _ = _pixels(_cfg(count=96, backgrounds=["solid"]))
    grey = x.astype(np.float64) @ LUMA / 255
    spread = grey.reshape(len(x), -1).max(1) - grey.reshape(len(x), -1).min(1)
    assert spread.min() > 0.25  # the colours are drawn dark-on-light or light-on-dark


def test_classes_are_distinct():
    """A nearest-mean classifier on each glyph's boxed ink: perfect in one face, far above chance in all."""
    k = len(GLYPH_CLASSES)
    plain = _cfg(count=4 * k, fonts=["sans"], backgrounds=["solid"], rotation=0, scale=[0.8, 0.8])
    x, y = _pixels(plain)
    assert _centroid_accuracy(_shape_features(x), y, k) > 0.95  # 1.0 measured
    x, y = _pixels(_cfg(count=30 * k))  # 16 faces, 5 textures, +-25 degrees: 0.73 measured (chance 0.04)
    assert _centroid_accuracy(_shape_features(x), y, k) > 0.5


def test_listed_lazily_at_a_million():
    src = open_source(_cfg(count=1_000_000))
    assert len(src.records) == 1_000_000
    rec = src.records[999_999]
    assert (rec.id, rec.label) == ("glyphs-999999", 999_999 % 24)
    assert np.asarray(rec.open()).shape == (32, 32, 3)


def test_prepare_builds_it(tmp_path):
    cfg = PrepareConfig(
        source="builtin:glyphs", channels=3, image_size=16, glyphs={"count": 120, "classes": list("ABCD")}
    )
    report = build_dataset(cfg, tmp_path / "processed", log=lambda _: None)
    meta = report["meta"]
    assert (meta["channels"], meta["image_size"], meta["class_names"]) == (3, 16, ["A", "B", "C", "D"])
    assert set(meta["class_counts"]["train"].values()) == {21} and sum(meta["counts"].values()) == 120


@pytest.mark.parametrize(
    ("params", "culprit"),
    [
        ({"classes": ["A"]}, "prepare.glyphs.classes"),
        ({"classes": ["A", "A"]}, "prepare.glyphs.classes"),
        ({"classes": ["A", "é"]}, "prepare.glyphs.classes"),
        ({"classes": ["A", "AB"]}, "prepare.glyphs.classes"),
        ({"fonts": ["comic"]}, "prepare.glyphs.fonts"),
        ({"backgrounds": ["plaid"]}, "prepare.glyphs.backgrounds"),
        ({"scale": [0.9, 0.5]}, "prepare.glyphs.scale"),
        ({"rotation": 360}, "prepare.glyphs.rotation"),
    ],
)
def test_bad_params_name_the_key(params, culprit):
    with pytest.raises(ParamsError) as info:
        validate_section("prepare", {"source": "builtin:glyphs", "glyphs": params})
    assert culprit in str(info.value) and "\n" not in str(info.value)


def test_missing_fonts_name_the_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(glyphs, "font_dir", lambda: tmp_path)
    with pytest.raises(DataError, match=r"prepare.glyphs.fonts: \['sans'\] not found under"):
        open_source(_cfg(count=4, fonts=["sans"]))
