"""Decoding, mode conversion, aspect policies and the PNG <-> [-1, 1] array round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from components.data.config import PrepareConfig
from components.data.images import (
    BadImageError,
    decode_image,
    encode_png,
    fit_size,
    png_to_array,
    pngs_to_array,
    standardize,
    to_channels,
)

BLUE = (0, 0, 255)


def test_bad_bytes_raise_naming_the_file(helpers):
    good = helpers.png_bytes(Image.new("RGB", (32, 32), (1, 2, 3)))
    cases = {b"": "zero-byte", b"hello, not an image": "not an image", good[: len(good) // 2]: "corrupt"}
    for data, reason in cases.items():
        with pytest.raises(BadImageError, match=reason) as info:
            decode_image(data, path="/x/cls/img.png")
        assert "/x/cls/img.png" in str(info.value)
        assert "\n" not in str(info.value)
        assert info.value.path == "/x/cls/img.png"


def test_every_odd_mode_becomes_l_and_rgb(helpers):
    for name, (data, what) in helpers.odd_images().items():
        img = decode_image(data, path=name)
        for channels, mode in ((1, "L"), (3, "RGB")):
            out = to_channels(img, channels=channels, background=BLUE)
            assert out.mode == mode, f"{name} ({what})"
            assert out.size == img.size


def test_transparency_composited_onto_background(helpers):
    odd = helpers.odd_images()
    rgba = to_channels(decode_image(odd["rgba.png"][0], path="rgba"), channels=3, background=BLUE)
    assert rgba.getpixel((0, 5)) == BLUE and rgba.getpixel((11, 5)) == (255, 0, 0)
    pal = to_channels(decode_image(odd["palette_trns.png"][0], path="p"), channels=3, background=BLUE)
    assert pal.getpixel((0, 0)) == BLUE and pal.getpixel((9, 0)) == (0, 255, 0)
    gif = to_channels(decode_image(odd["anim.gif"][0], path="g"), channels=3, background=BLUE)
    assert gif.getpixel((0, 0)) == BLUE and gif.getpixel((9, 0)) == (0, 255, 0)
    webp = to_channels(decode_image(odd["alpha.webp"][0], path="w"), channels=3, background=BLUE)
    assert webp.getpixel((0, 5)) == BLUE and webp.getpixel((11, 5)) == (255, 0, 0)
    la = to_channels(
        decode_image(odd["grey_alpha.png"][0], path="la"), channels=1, background=(255, 255, 255)
    )
    assert la.getpixel((0, 0)) == 255 and la.getpixel((9, 0)) == 200


def test_wide_grey_scaled_to_8_bits(helpers):
    img = decode_image(helpers.odd_images()["deep.png"][0], path="deep")
    assert img.mode.startswith("I")
    out = np.asarray(to_channels(img, channels=1, background=(0, 0, 0)))
    expected = np.clip(np.rint(np.arange(100).reshape(10, 10) * 600 / 257), 0, 255)
    np.testing.assert_array_equal(out, expected)


def test_cmyk_and_bilevel(helpers):
    odd = helpers.odd_images()
    cmyk = to_channels(decode_image(odd["cmyk.jpg"][0], path="c"), channels=3, background=BLUE)
    r, g, b = cmyk.getpixel((8, 8))
    assert r > 240 and g < 15 and b > 240  # C=0 M=255 Y=0 K=0 is magenta
    bilevel = to_channels(decode_image(odd["bilevel.bmp"][0], path="b"), channels=1, background=BLUE)
    assert set(np.unique(np.asarray(bilevel))) == {255}


def _bands() -> Image.Image:
    """40x20: columns 0-9 red, 10-29 green, 30-39 blue."""
    x = np.zeros((20, 40, 3), np.uint8)
    x[:, :10] = (255, 0, 0)
    x[:, 10:30] = (0, 255, 0)
    x[:, 30:] = (0, 0, 255)
    return Image.fromarray(x)


def test_center_crop_keeps_the_middle():
    out = np.asarray(fit_size(_bands(), size=10, aspect="center_crop", background=(9, 9, 9)))
    assert out.shape == (10, 10, 3)
    assert (out[..., 1] >= 250).all() and (out[..., 0] <= 5).all()  # only the green middle is left


def test_pad_centres_on_background():
    out = np.asarray(fit_size(_bands(), size=10, aspect="pad", background=(9, 9, 9)))
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[:2], 9)  # 40x20 -> 10x5 content, rows 0-1 and 8-9 padding
    np.testing.assert_array_equal(out[-2:], 9)
    assert out[5, 0, 0] > 200 and out[5, 5, 1] > 200 and out[5, 9, 2] > 200


def test_pad_grey_uses_background_luma():
    out = np.asarray(fit_size(Image.new("L", (20, 10), 255), size=10, aspect="pad", background=(0, 0, 255)))
    assert out[0, 0] == Image.new("RGB", (1, 1), (0, 0, 255)).convert("L").getpixel((0, 0))
    assert out[5, 5] == 255


def test_stretch_keeps_all_content():
    out = np.asarray(fit_size(_bands(), size=10, aspect="stretch", background=(9, 9, 9)))
    assert out.shape == (10, 10, 3)
    assert out[5, 0, 0] > 200 and out[5, 5, 1] > 200 and out[5, 9, 2] > 200


@pytest.mark.parametrize("aspect", ["center_crop", "pad", "stretch"])
@pytest.mark.parametrize(("src", "size"), [((8, 8), 16), ((30, 17), 12), ((5, 40), 7)])
def test_every_policy_gives_the_target_size(aspect, src, size):
    out = fit_size(Image.new("RGB", src, (3, 4, 5)), size=size, aspect=aspect, background=(0, 0, 0))
    assert out.size == (size, size)


def test_unknown_aspect_lists_choices():
    with pytest.raises(ValueError, match="center_crop"):
        fit_size(Image.new("L", (4, 5)), size=4, aspect="zoom", background=(0, 0, 0))


def test_png_round_trip_to_unit_range():
    cfg = PrepareConfig(image_size=4, channels=3)
    x = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    img = standardize(Image.fromarray(x), cfg=cfg)
    arr = png_to_array(encode_png(img), channels=3)
    assert arr.dtype == np.float32 and arr.shape == (3, 4, 4)
    np.testing.assert_allclose(arr, x.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    grey = png_to_array(encode_png(Image.fromarray(np.array([[0, 255]], np.uint8))), channels=1)
    np.testing.assert_array_equal(grey, [[[-1.0, 1.0]]])
    assert pngs_to_array([], channels=3, size=4).shape == (0, 3, 4, 4)


def test_png_of_wrong_mode_is_refused():
    with pytest.raises(ValueError, match="expected 'RGB'"):
        png_to_array(encode_png(Image.new("L", (2, 2))), channels=3)


def test_encode_is_deterministic():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert encode_png(img) == encode_png(img.copy())
    assert Image.open(io.BytesIO(encode_png(img))).format == "PNG"
