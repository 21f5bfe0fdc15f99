"""Hostile image files: small uploads built to cost a decoder as much memory or CPU as
they can. Used by ``bench/hostile.py`` (against a live server) and by the tests.

Every generator takes the pixel budget it should aim at (a server's
``IMAGEFINDER_MAX_PIXELS``) so the files sit right at the limit, where they hurt most,
and returns the encoded bytes. Each is deterministic.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def square_side(pixels: int, limit: int = 65500) -> int:
    return min(limit, int(math.isqrt(pixels)))


# -- memory: big canvases in few bytes ---------------------------------------------------


def webp_lossless(pixels: int) -> bytes:
    """A flat lossless WebP (a few KB) of up to 16383 x 16383 pixels."""
    side = square_side(pixels, 16383)
    return _save(Image.new("RGB", (side, side), (90, 120, 200)), "WEBP", lossless=True, method=0)


def webp_alpha(pixels: int) -> bytes:
    side = square_side(pixels, 16383)
    img = Image.new("RGBA", (side, side), (90, 120, 200, 128))
    return _save(img, "WEBP", lossless=True, method=0)


def png_16bit_grey(pixels: int) -> bytes:
    """A 16-bit greyscale PNG (the path that went through float64)."""
    side = square_side(pixels)
    img = Image.new("I;16", (side, side), 40000)
    return _save(img, "PNG", compress_level=9)


def png_rgba(pixels: int) -> bytes:
    """An RGBA PNG: the alpha path that made several full-size RGBA copies."""
    side = square_side(pixels)
    return _save(Image.new("RGBA", (side, side), (10, 200, 30, 100)), "PNG", compress_level=9)


def png_16bit_rgba(pixels: int) -> bytes:
    """A 16-bit-per-channel RGBA PNG, written by hand (Pillow saves 8-bit RGBA only)."""
    side = square_side(pixels)
    row = b"\x00" + b"\x80\x00\x40\x00\x20\x00\x90\x00" * side
    return _png(side, side, 16, 6, _deflate_rows(row, side))


def png_palette_transparent(pixels: int) -> bytes:
    side = square_side(pixels)
    img = Image.new("P", (side, side), 3)
    img.putpalette([i % 256 for i in range(768)])
    return _save(img, "PNG", transparency=3, compress_level=9)


def gif_big(pixels: int) -> bytes:
    side = square_side(pixels)
    img = Image.new("P", (side, side), 1)
    img.putpalette([i % 256 for i in range(768)])
    return _save(img, "GIF")


def bmp_rle8(pixels: int) -> bytes:
    """An 8-bit run-length-encoded BMP: each row is a few bytes, the canvas is huge."""
    side = square_side(pixels, 30000)
    runs = bytearray()
    for _ in range(side):
        left = side
        while left:
            n = min(255, left)
            runs += bytes((n, 7))
            left -= n
        runs += b"\x00\x00"  # end of line
    runs += b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(runs), 2835, 2835, 256, 0)
    head = b"BM" + struct.pack("<IHHI", offset + len(runs), 0, 0, offset)
    return head + info + palette + bytes(runs)


def tiff_deflate(pixels: int) -> bytes:
    side = square_side(pixels)
    return _save(
        Image.new("RGB", (side, side), (1, 2, 3)), "TIFF", compression="tiff_adobe_deflate"
    )


def tiff_float(pixels: int) -> bytes:
    """A 32-bit float greyscale TIFF (mode F)."""
    side = square_side(pixels)
    return _save(Image.new("F", (side, side), 0.5), "TIFF", compression="tiff_adobe_deflate")


def jpeg_big(pixels: int) -> bytes:
    """A baseline JPEG with as many pixels as allowed (cheap: decoded at 1/8 scale)."""
    side = square_side(pixels)
    return _save(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", quality=10)


def jpeg_progressive_cmyk(pixels: int) -> bytes:
    """A progressive 4:4:4 CMYK JPEG: libjpeg keeps every coefficient of every
    component in memory until the last scan, at any decoding scale."""
    side = square_side(pixels)
    img = Image.new("CMYK", (side, side), (10, 20, 30, 40))
    return _save(img, "JPEG", progressive=True, quality=10, subsampling=0)


def jpeg_progressive_444(pixels: int) -> bytes:
    side = square_side(pixels)
    img = Image.new("RGB", (side, side), (10, 20, 30))
    return _save(img, "JPEG", progressive=True, quality=10, subsampling=0)


# -- CPU: work that grows with a count, not with pixels -----------------------------------


def tiff_many_ifds(count: int = 40_000) -> bytes:
    """A little-endian TIFF chaining ``count`` 1x1 greyscale IFDs (``n_frames`` walks
    them all, each walk step re-reading the chain)."""
    entries = 8
    ifd_size = 2 + entries * 12 + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    pixel_at = 8 + count * ifd_size
    for i in range(count):
        here = 8 + i * ifd_size
        nxt = here + ifd_size if i + 1 < count else 0
        tags = [
            (256, 3, 1, 1),  # width
            (257, 3, 1, 1),  # height
            (258, 3, 1, 8),  # bits per sample
            (259, 3, 1, 1),  # no compression
            (262, 3, 1, 1),  # black is zero
            (273, 4, 1, pixel_at),  # strip offset
            (278, 3, 1, 1),  # rows per strip
            (279, 4, 1, 1),  # strip byte count
        ]
        out += struct.pack("<H", entries)
        for tag, kind, n, value in tags:
            out += struct.pack("<HHII", tag, kind, n, value)
        out += struct.pack("<I", nxt)
    out += b"\x80"
    return bytes(out)


def jpeg_repeated_scans(repeats: int = 3000, side: int = 4000) -> bytes:
    """A progressive JPEG whose one AC scan (all zeros: a few bytes of EOB runs) is
    repeated ``repeats`` times; each repeat makes libjpeg walk every block again."""
    data = _save(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=50)
    scans = _scans(data)
    head_end = scans[0][0]
    # The smallest AC scan: an SOS whose spectral selection starts above 0.
    ac = min(
        (s for s in scans if data[s[0] + 5 + 1 + 2 * data[s[0] + 4]] > 0), key=lambda s: s[1] - s[0]
    )
    body = b"".join(data[a:b] for a, b in scans)
    return data[:head_end] + body + data[ac[0] : ac[1]] * repeats + b"\xff\xd9"


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each SOS segment plus its entropy-coded data."""
    out = []
    i = data.index(b"\xff\xda")
    while i < len(data) - 2:
        j = i + 2
        while True:
            j = data.index(b"\xff", j)
            if data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                j += 2
                continue
            break
        out.append((i, j))
        if data[j + 1] != 0xDA:
            # Tables between scans (DHT) belong to the next scan.
            k = data.find(b"\xff\xda", j)
            if k < 0:
                break
            out[-1] = (i, k)
            i = k
        else:
            i = j
    return out


def png_zlib_bomb(pixels: int) -> bytes:
    """A small PNG whose IDAT inflates far past its declared 1000 x 1000 image."""
    side = 1000
    row = b"\x00" + b"\x00" * side
    return _png(side, side, 8, 0, zlib.compress(row * side * 50, 9))


def apng_many_frames(frames: int = 5000) -> bytes:
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    rest = [Image.new("RGB", (8, 8), (i % 256, 2, 3)) for i in range(1, frames)]
    return _save(img, "PNG", save_all=True, append_images=rest, duration=10)


def gif_many_frames(frames: int = 20000) -> bytes:
    img = Image.new("P", (4, 4), 0)
    rest = [Image.new("P", (4, 4), i % 200) for i in range(1, frames)]
    return _save(img, "GIF", save_all=True, append_images=rest, duration=10, optimize=False)


# -- helpers ---------------------------------------------------------------------------


def _deflate_rows(row: bytes, rows: int) -> bytes:
    z = zlib.compressobj(9)
    out = [z.compress(row) for _ in range(rows)]
    out.append(z.flush())
    return b"".join(out)


def _png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# name -> (what it attacks, generator taking the pixel budget)
CLASSES: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "webp-lossless": ("memory", webp_lossless),
    "webp-alpha": ("memory", webp_alpha),
    "png-16bit-grey": ("memory", png_16bit_grey),
    "png-16bit-rgba": ("memory", png_16bit_rgba),
    "png-rgba": ("memory", png_rgba),
    "png-palette-alpha": ("memory", png_palette_transparent),
    "gif-big": ("memory", gif_big),
    "bmp-rle8": ("memory", bmp_rle8),
    "tiff-deflate": ("memory", tiff_deflate),
    "tiff-float": ("memory", tiff_float),
    "jpeg-big": ("memory", jpeg_big),
    "jpeg-progressive-444": ("memory", jpeg_progressive_444),
    "jpeg-progressive-cmyk": ("memory", jpeg_progressive_cmyk),
    "png-zlib-bomb": ("cpu", png_zlib_bomb),
    "tiff-40k-ifds": ("cpu", lambda _: tiff_many_ifds(40_000)),
    "jpeg-3000-scans": ("cpu", lambda _: jpeg_repeated_scans(3000)),
    "apng-5000-frames": ("cpu", lambda _: apng_many_frames(5000)),
    "gif-20000-frames": ("cpu", lambda _: gif_many_frames(20000)),
}


def noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# -- CPU in the container: segment and chunk floods before the pixels ---------------------


def jpeg_many_segments(size: int = 20_000_000) -> bytes:
    """A tiny JPEG behind millions of empty APP15 segments (4 bytes each)."""
    small = _save(Image.new("RGB", (8, 8)), "JPEG")
    return small[:2] + b"\xff\xef\x00\x02" * ((size - len(small)) // 4) + small[2:]


def png_many_chunks(size: int = 20_000_000) -> bytes:
    """A tiny PNG with a million unknown ancillary chunks before its pixels."""
    small = _save(Image.new("RGB", (8, 8)), "PNG")
    chunk = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))
    at = small.index(b"IDAT") - 4
    return small[:at] + chunk * ((size - len(small)) // len(chunk)) + small[at:]


def gif_many_extensions(size: int = 20_000_000) -> bytes:
    """A tiny GIF behind a million empty comment extensions."""
    small = _save(Image.new("P", (8, 8)), "GIF")
    at = small.index(b",")  # the first image descriptor
    return small[:at] + b"\x21\xfe\x00" * ((size - len(small)) // 3) + small[at:]


def tiff_one_strip_16bit(pixels: int) -> bytes:
    """A 16-bit RGBA TIFF stored as one deflated strip: libtiff inflates the whole strip
    (8 bytes a pixel) into its own buffer before Pillow unpacks it."""
    side = square_side(pixels)
    row = b"\x80\x00\x40\x00\x20\x00\xff\xff" * side
    strip = _deflate_rows(row, side)
    entries = [
        (256, 4, 1, side),
        (257, 4, 1, side),
        (258, 3, 4, None),
        (259, 3, 1, 8),
        (262, 3, 1, 2),
        (273, 4, 1, None),
        (277, 3, 1, 4),
        (278, 4, 1, side),
        (279, 4, 1, len(strip)),
        (338, 3, 1, 2),
    ]
    ifd_at = 8
    bits_at = ifd_at + 2 + 12 * len(entries) + 4
    strip_at = bits_at + 8
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits_at
        elif tag == 273:
            value = strip_at
        out += struct.pack("<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0) + struct.pack("<4H", 16, 16, 16, 16) + strip
    return bytes(out)


CLASSES.update(
    {
        "tiff-one-strip-16bit": ("memory", tiff_one_strip_16bit),
        "jpeg-5m-segments": ("cpu", lambda _: jpeg_many_segments()),
        "png-1m-chunks": ("cpu", lambda _: png_many_chunks()),
        "gif-6m-extensions": ("cpu", lambda _: gif_many_extensions()),
    }
)
