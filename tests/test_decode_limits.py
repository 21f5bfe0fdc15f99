"""Decoding under a budget: what an upload may cost is decided from its header.

Memory: a picture decodes at the smallest size the caller can use (JPEGs at a reduced
DCT scale, every other format shrunk a band of rows at a time), never through float64
or full-size RGBA copies; a file whose decoder would need more than
``4 bytes x IMAGEFINDER_MAX_PIXELS`` is a 413 before any pixel is decoded. CPU: no
frame or IFD is ever counted, and JPEG scans, PNG chunks and GIF blocks are capped.
The figures (peak RSS, CPU seconds per class) come from bench/hostile.py; these tests
pin the behaviour that makes them possible.
"""

from __future__ import annotations

import io

import hostile_files as hostile
import numpy as np
import pytest
from PIL import GifImagePlugin, Image, TiffImagePlugin

from imagefinder import imagecost, memory
from imagefinder.errors import TooComplex, TooManyPixels
from imagefinder.images import load_rgb, probe


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"])
def test_a_large_picture_comes_out_no_larger_than_the_caller_needs(fmt):
    data = encode(Image.new("RGB", (2400, 1600), (30, 90, 200)), fmt)
    out = load_rgb(data, 20_000_000, min_side=224)
    assert out.mode == "RGB"
    assert 224 <= min(out.size) < 2 * 224 or (fmt == "JPEG" and min(out.size) == 200)
    assert out.size[0] / out.size[1] == pytest.approx(1.5, rel=0.02)  # shape kept
    r, g, b = out.getpixel((out.size[0] // 2, out.size[1] // 2))
    assert abs(r - 30) < 8 and abs(g - 90) < 8 and abs(b - 200) < 8  # colour kept


def test_shrinking_averages_transparent_pixels_without_their_hidden_colour():
    """Fully transparent pixels hold pure green; shown on white they are white. A shrink
    that averaged straight RGBA would tint the result green."""
    arr = np.zeros((800, 800, 4), dtype=np.uint8)
    arr[..., 1] = 255  # green, alpha 0
    arr[::2, ::2] = (255, 0, 0, 255)  # a quarter of the pixels: opaque red
    out = load_rgb(encode(Image.fromarray(arr, "RGBA"), "PNG"), 10_000_000, min_side=100)
    r, g, b = np.asarray(out).reshape(-1, 3).mean(axis=0)
    # A quarter red and three quarters white: (255, 191, 191).
    assert r == pytest.approx(255, abs=2) and g == pytest.approx(191, abs=3), (r, g, b)
    assert g == pytest.approx(b, abs=2)  # no green tint


def test_sixteen_bit_pictures_shrink_scaled_not_clipped():
    arr = np.full((1000, 1000), 32768, dtype=np.uint16)
    out = load_rgb(encode(Image.fromarray(arr), "PNG"), 10_000_000, min_side=100)
    assert out.size == (100, 100)
    assert np.asarray(out)[50, 50].tolist() == [127, 127, 127]


def test_a_float_tiff_is_scaled_to_its_maximum():
    arr = np.tile(np.linspace(0, 4.0, 600, dtype=np.float32), (400, 1))
    out = np.asarray(load_rgb(encode(Image.fromarray(arr, "F"), "TIFF"), 10**7, min_side=40))
    assert out[:, 0].max() < 10 and out[:, -1].min() > 240


@pytest.mark.parametrize(
    "make, cap, words",
    [
        # 2000 x 2000 lossless WebP: ~60 MB through libwebp's animation decoder.
        (lambda: hostile.webp_lossless(4_000_000), 4_000_000, "WEBP needs about"),
        # Progressive CMYK 4:4:4: every coefficient of 4 components is kept.
        (lambda: hostile.jpeg_progressive_cmyk(5_760_000), 5_760_000, "JPEG needs about"),
        # 16-bit RGBA in one deflated strip: libtiff inflates it whole (8 bytes a pixel).
        (lambda: hostile.tiff_one_strip_16bit(4_000_000), 4_000_000, "TIFF needs about"),
    ],
    ids=["webp", "progressive-cmyk-jpeg", "tiff-one-strip"],
)
def test_a_file_whose_decoder_needs_more_than_the_budget_is_refused_unread(make, cap, words):
    data = make()
    with pytest.raises(TooManyPixels, match=words):
        load_rgb(data, cap, min_side=224)
    with pytest.raises(TooManyPixels, match=words):
        probe(data, cap)
    # The same pixels in a format that needs 4 bytes a pixel decode under the same cap.
    side = int(cap**0.5)
    assert load_rgb(encode(Image.new("RGB", (side, side)), "PNG"), cap, 224).size[0] >= 224


def test_the_budget_follows_the_pixel_cap():
    img = Image.open(io.BytesIO(encode(Image.new("RGBA", (100, 100)), "PNG")))
    assert imagecost.decode_bytes(img, None, 1) == 100 * 100 * 4
    baseline = Image.open(io.BytesIO(hostile.jpeg_big(4_000_000)))
    layout = imagecost.jpeg_layout(hostile.jpeg_big(4_000_000), 4_000_000)
    assert layout is not None and len(layout.scans) == 1
    # A baseline JPEG decoded at 1/8 scale costs 1/64 of its pixels.
    assert imagecost.decode_bytes(baseline, layout, 8) == 250 * 250 * 4


def no_frame_count(self):
    raise AssertionError("n_frames was asked for: Pillow walks every frame to answer")


@pytest.mark.parametrize(
    "plugin, data",
    [
        (TiffImagePlugin.TiffImageFile, lambda: hostile.tiff_many_ifds(5000)),
        (GifImagePlugin.GifImageFile, lambda: hostile.gif_many_frames(300)),
    ],
    ids=["tiff", "gif"],
)
def test_decoding_never_counts_frames(monkeypatch, plugin, data):
    """TIFF and GIF count frames by walking them (APNG and WebP read a count from a header)."""
    payload = data()
    monkeypatch.setattr(plugin, "n_frames", property(no_frame_count), raising=False)
    assert load_rgb(payload, 10_000_000, min_side=4).mode == "RGB"
    probe(payload, 10_000_000)


@pytest.mark.parametrize(
    "data, words",
    [
        (lambda: hostile.jpeg_repeated_scans(300, side=256), "over 200 scans"),
        (lambda: hostile.jpeg_repeated_scans(150, side=2000), "block decodes"),
        (lambda: hostile.jpeg_many_segments(40_000), "marker segments"),
        (lambda: hostile.png_many_chunks(400_000), "chunks"),
        (lambda: hostile.gif_many_extensions(100_000), "blocks before its picture"),
    ],
    ids=["jpeg-scans", "jpeg-scan-work", "jpeg-segments", "png-chunks", "gif-blocks"],
)
def test_a_file_built_to_make_its_decoder_crawl_is_refused(data, words):
    payload = data()
    with pytest.raises(TooComplex, match=words):
        load_rgb(payload, 4_000_000, min_side=224)


def test_real_progressive_jpegs_are_well_within_the_scan_caps(caltech_dir):
    photo = Image.open(next(caltech_dir.glob("*/*.jpg"))).convert("RGB")
    for subsampling in (0, 2):
        data = encode(photo, "JPEG", progressive=True, subsampling=subsampling)
        layout = imagecost.jpeg_layout(data, photo.size[0] * photo.size[1])
        assert layout is not None and 5 <= len(layout.scans) <= 20
        assert load_rgb(data, 10**7, min_side=64).size[0] >= 64


def test_memory_is_handed_back_after_a_large_decode():
    assert memory.release() is True  # glibc: malloc_trim ran
