"""Safe decoding: bytes decide the format, every input becomes upright RGB under a pixel cap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from support import image_bytes

from imagefinder.images import ImageError, NotAnImage, TooManyPixels, load_rgb, probe

CAP = 10_000_000


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    # Stored 60 wide x 20 high, left half red; orientation 6 means "rotate 90 clockwise to view".
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_rgb(encode(img, "JPEG", exif=exif, quality=95), CAP)
    assert out.size == (20, 60)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[55, 10]
    assert top[0] > 200 and top[2] < 60  # the red half ends up on top
    assert bottom[2] > 200 and bottom[0] < 60


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    img.paste(0, (0, 0, 4, 8))
    return encode(img, "PNG", transparency=0)


def _cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")


def _sixteen_bit_png() -> bytes:
    # Mid-grey at 16 bits: a clipping conversion would turn it white.
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[:, :4] = 0
    return encode(Image.fromarray(arr), "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


@pytest.mark.parametrize(
    "data, left, right",
    [
        pytest.param(image_bytes(mode="L", color=None, fmt="PNG"), None, None, id="grayscale"),
        pytest.param(
            _palette_with_transparency(), (255, 255, 255), (10, 200, 10), id="palette+alpha"
        ),
        pytest.param(encode(Image.new("P", (8, 8), 0), "GIF"), None, None, id="palette"),
        pytest.param(_cmyk_jpeg(), None, None, id="cmyk"),
        pytest.param(_sixteen_bit_png(), (0, 0, 0), (128, 128, 128), id="16-bit"),
        pytest.param(_animated_gif(), (255, 0, 0), (255, 0, 0), id="animated-first-frame"),
        pytest.param(
            encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"),
            (255, 255, 255),
            (255, 255, 255),
            id="rgba-transparent-on-white",
        ),
        pytest.param(
            encode(Image.new("LA", (8, 8), (0, 255)), "PNG"), (0, 0, 0), (0, 0, 0), id="LA"
        ),
        pytest.param(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "WEBP"), None, None, id="webp"),
        pytest.param(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "TIFF"), None, None, id="tiff"),
        pytest.param(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "BMP"), None, None, id="bmp"),
    ],
)
def test_every_mode_comes_out_rgb(data, left, right):
    img = load_rgb(data, CAP)
    assert img.mode == "RGB"
    arr = np.asarray(img).astype(int)
    if left is not None:
        assert np.abs(arr[4, 1] - left).max() <= 8, arr[4, 1]
        assert np.abs(arr[4, -2] - right).max() <= 8, arr[4, -2]


def test_cmyk_colours_survive_conversion():
    r, g, b = np.asarray(load_rgb(_cmyk_jpeg(), CAP))[8, 8]
    assert r > 200 and g < 60 and b < 60  # C=0, M=Y=full is red


def test_pixel_cap_refuses_before_decoding():
    # A one-bit PNG: a few KB on the wire, 110 megapixels (330 MB as RGB) once decoded.
    bomb = encode(Image.new("1", (11_000, 10_000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(TooManyPixels) as e:
        load_rgb(bomb, max_pixels=100_000_000)
    assert e.value.code == "too_many_pixels"
    assert "11000x10000" in str(e.value) and "100,000,000" in str(e.value)


def test_pixel_cap_is_a_setting():
    data = image_bytes((64, 48))
    assert load_rgb(data, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(TooManyPixels):
        load_rgb(data, max_pixels=64 * 48 - 1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected(fmt):
    data = image_bytes((256, 256), fmt=fmt)
    with pytest.raises(NotAnImage) as e:
        load_rgb(data[: len(data) // 2], CAP)
    assert e.value.code == "not_an_image"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, I am text",
        b"<!doctype html><html><body>404</body></html>",
        b"\xff\xd8\xff\xe0" + b"\x00" * 50,  # a JPEG signature and nothing behind it
        encode(Image.new("RGB", (16, 16)), "ICO"),  # a real image, but not a format we accept
    ],
    ids=["empty", "text", "html", "jpeg-magic-only", "ico"],
)
def test_things_that_are_not_images_are_rejected(data):
    with pytest.raises(NotAnImage):
        load_rgb(data, CAP)


def test_format_comes_from_bytes_not_the_name(tmp_path):
    png_named_jpg = tmp_path / "photo.jpg"
    png_named_jpg.write_bytes(image_bytes(fmt="PNG"))
    assert probe(png_named_jpg, CAP) == "PNG"
    text_named_png = tmp_path / "photo.png"
    text_named_png.write_text("not an image")
    with pytest.raises(ImageError):
        probe(text_named_png, CAP)
    assert probe(image_bytes(fmt="GIF"), CAP) == "GIF"


def test_probe_decodes_the_whole_file(tmp_path):
    # The header alone is fine; only a full decode notices the missing data.
    data = image_bytes((256, 256))
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NotAnImage, match="truncated"):
        probe(path, CAP)


def test_large_jpegs_decode_reduced_but_never_below_min_side():
    img = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    )
    data = encode(img, "JPEG")
    full = load_rgb(data, CAP)
    reduced = load_rgb(data, CAP, min_side=224)
    assert full.size == (1600, 1200)
    assert min(reduced.size) >= 224 and reduced.size[0] < 1600
