"""Safe image decoding: the only place that turns bytes or files into pixels.

Whether something is an image is decided from its bytes, never from its name.
Everything that reaches a model is an RGB ``PIL.Image`` with EXIF orientation
applied, decoded under a pixel cap.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile

from . import memory
from .errors import ImageError, NotAnImage, TooManyPixels
from .imagecost import (
    BYTES_PER_PIXEL,
    SLACK_BYTES,
    JpegLayout,
    check_structure,
    decode_bytes,
    jpeg_scale,
    needs_walk,
)


@dataclass(frozen=True)
class Format:
    """One image format: how it is saved, served and recognised by file name."""

    extension: str  # what a saved file gets: <id>.<extension>
    media_type: str
    suffixes: tuple[str, ...]  # every suffix a file of this format may carry


# The formats we decode, by Pillow's name. Restricting Image.open to these keeps exotic
# plugins (EPS calls Ghostscript, for one) away from untrusted uploads. MPO
# (multi-picture JPEGs from phones) opens through the JPEG plugin; browsers show its
# first frame.
_JPEG = Format("jpg", "image/jpeg", ("jpg", "jpeg"))
FORMATS: dict[str, Format] = {
    "JPEG": _JPEG,
    "MPO": _JPEG,
    "PNG": Format("png", "image/png", ("png",)),
    "GIF": Format("gif", "image/gif", ("gif",)),
    "WEBP": Format("webp", "image/webp", ("webp",)),
    "BMP": Format("bmp", "image/bmp", ("bmp",)),
    "TIFF": Format("tif", "image/tiff", ("tif", "tiff")),
}
_OPEN_FORMATS = tuple(name for name in FORMATS if name != "MPO")
# Every suffix an image file may carry (the extractor's filter, the downloader's twins).
SUFFIXES = tuple(sorted({s for f in FORMATS.values() for s in f.suffixes}))

# Register every plugin now: Image.open(formats=...) only looks at loaded ones.
Image.init()
# Truncated files must fail, not decode half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own, configurable cap before decoding; PIL's would fire first
# with a less helpful message for caps above its default.
Image.MAX_IMAGE_PIXELS = None


Source = bytes | str | Path | BinaryIO

# Rows are converted to RGB and shrunk a band at a time, so no full-size copy (RGBA for
# compositing, 16-bit scaling...) is ever made beside the decoded image.
_BAND_BYTES = 4 << 20
# Above this a decode returns its memory to the OS as soon as it is done.
_TRIM_BYTES = 32 << 20
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _open(source: Source, max_pixels: int | None = None) -> tuple[Image.Image, JpegLayout | None]:
    """Open ``source`` (no pixels decoded). A JPEG's markers, a PNG's chunks and a GIF's
    blocks are walked first, with caps, so a file of a million empty segments is refused
    before Pillow parses them one by one."""
    layout = None
    if isinstance(source, str | Path):
        with open(source, "rb") as f:
            if needs_walk(f.read(8)):
                f.seek(0)
                source = f.read()
    elif not isinstance(source, bytes | bytearray):
        head = source.read(8)
        source.seek(0)
        if needs_walk(head):
            source = source.read()
    if isinstance(source, bytes | bytearray) and needs_walk(bytes(source[:8])):
        layout = check_structure(bytes(source), max_pixels or _NO_CAP)
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp, formats=_OPEN_FORMATS), layout
    except FileNotFoundError:
        raise
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise NotAnImage(f"not a supported image ({', '.join(_OPEN_FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise NotAnImage(f"corrupt image header: {e}") from e


_NO_CAP = 1 << 62


def sniff(source: Source) -> str:
    """The format ``source``'s header names (cheap: no pixels are decoded)."""
    return _open(source)[0].format or "?"


def probe(source: Source, max_pixels: int) -> str:
    """Check that ``source`` (bytes or a path) fully decodes. Returns its format.

    Every byte of pixel data is decoded, at the least memory the format allows (JPEGs
    at 1/8 scale), and nothing is converted."""
    img, layout = _open(source, max_pixels)
    fmt = img.format or "?"
    _decode(img, layout, max_pixels, 1)
    return fmt


def load_rgb(source: Source, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decode ``source`` into an upright RGB image.

    ``min_side``: the output may shrink as long as both sides stay at least that large
    (the model only ever sees 224 pixels or so). JPEGs then decode at a reduced DCT scale
    (``Image.draft``: a 12 MP photo about 6x faster); other formats decode at full size
    and shrink by an integer factor a band of rows at a time. None keeps full size.
    """
    img, layout = _open(source, max_pixels)
    img = _decode(img, layout, max_pixels, min_side)
    try:
        # Read before the shrink: the new image carries no EXIF (a PNG's may follow its pixels).
        orientation = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block is not worth refusing the picture for
        orientation = None
    try:
        factor = max(1, min(img.size) // min_side) if min_side else 1
        out = _shrink_to_rgb(img, factor)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise NotAnImage(f"corrupt or truncated image: {e}") from e
    big = img.size[0] * img.size[1] * 4 >= _TRIM_BYTES
    del img
    if big:
        memory.release()
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return out.transpose(method) if method is not None else out


def _decode(
    img: Image.Image, layout: JpegLayout | None, max_pixels: int, min_side: int | None
) -> Image.Image:
    """Check ``img`` against the caps, then decode its first frame (JPEGs at the DCT scale
    ``min_side`` allows). No frame count is ever asked for: Pillow walks every frame or
    IFD to answer it, which a TIFF of 40,000 IFDs turns into minutes."""
    fmt = img.format or "?"
    width, height = img.size
    if width < 1 or height < 1:
        raise NotAnImage("image has no pixels")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}"
        )
    scale = jpeg_scale(img.size, min_side) if fmt in ("JPEG", "MPO") and min_side else 1
    cost = decode_bytes(img, layout, scale)
    budget = BYTES_PER_PIXEL * max_pixels + SLACK_BYTES
    if cost > budget:
        raise TooManyPixels(
            f"a {width}x{height} {fmt} needs about {cost >> 20:,} MB to decode, over the "
            f"limit of {budget >> 20:,} MB ({max_pixels:,} pixels at {BYTES_PER_PIXEL} bytes)"
        )
    try:
        if scale > 1:
            img.draft(None, (width // scale, height // scale))
        img.load()
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise NotAnImage(f"corrupt or truncated image: {e}") from e
    finally:
        if cost >= _TRIM_BYTES:
            memory.release()
    return img


def _shrink_to_rgb(img: Image.Image, factor: int) -> Image.Image:
    """``img`` as RGB, ``factor`` times smaller on each side (a box filter). Nothing
    full-size is made beside ``img``: modes Pillow can shrink directly shrink first and
    convert after; the others convert and shrink one band of rows at a time."""
    mode, (w, h) = img.mode, img.size
    top = _float_top(img)
    if factor > 1 and mode in _REDUCIBLE:
        return _band_to_rgb(img.reduce(factor), top)
    if mode == "RGB" and factor == 1:
        return img
    alpha = _has_alpha(img)
    # Transparent pixels are averaged premultiplied (RGBa), so their colour cannot bleed.
    out = Image.new("RGBa" if alpha else "RGB", (-(-w // factor), -(-h // factor)))
    rows = max(factor, (_BAND_BYTES // (w * 4)) // factor * factor)
    for y in range(0, h, rows):
        band = img.crop((0, y, w, min(h, y + rows)))
        band = band.convert("RGBA").convert("RGBa") if alpha else _band_to_rgb(band, top)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, y // factor))
    return _band_to_rgb(out.convert("RGBA"), top) if alpha else out


# Modes Image.reduce takes that have no alpha to composite.
_REDUCIBLE = ("L", "RGB", "I", "F", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    )


def _float_top(img: Image.Image) -> float:
    """The value that maps to white: 65535 for 16-bit integers, the maximum for floats."""
    if img.mode != "F":
        return 65535.0
    high = img.getextrema()[1]
    high = float(high) if isinstance(high, int | float) else 1.0
    return max(high, 1.0) if math.isfinite(high) else 1.0


def _band_to_rgb(img: Image.Image, top: float) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: PIL's convert clips at 255, so scale instead (float32:
        # a band at a time, never a float64 copy of the picture).
        arr = np.asarray(img).astype(np.float32)
        arr *= 255.0 / top
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def is_image_path(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in SUFFIXES and not path.name.startswith(".")
