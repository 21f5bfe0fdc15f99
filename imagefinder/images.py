"""Safe image decoding: the only place that turns bytes or files into pixels.

Whether something is an image is decided from its bytes, never from its name.
Everything that reaches a model is an RGB ``PIL.Image`` with EXIF orientation
applied, decoded under a pixel cap.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import ImageError, NotAnImage, TooManyPixels


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


def _open(source: Source) -> Image.Image:
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp, formats=_OPEN_FORMATS)
    except FileNotFoundError:
        raise
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise NotAnImage(f"not a supported image ({', '.join(_OPEN_FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise NotAnImage(f"corrupt image header: {e}") from e


def sniff(source: Source) -> str:
    """The format ``source``'s header names (cheap: no pixels are decoded)."""
    return _open(source).format or "?"


def probe(source: Source, max_pixels: int) -> str:
    """Check that ``source`` (bytes or a path) fully decodes. Returns its format."""
    fmt = sniff(source)
    load_rgb(source, max_pixels)
    return fmt


def load_rgb(source: Source, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decode ``source`` into an upright RGB image.

    ``min_side`` lets JPEGs decode at a reduced DCT scale (``Image.draft``) as long
    as both sides stay at least that large: a 12 MP photo then decodes about 6x
    faster, and the model only ever sees 224 pixels anyway.
    """
    img = _open(source)
    fmt = img.format or "?"
    width, height = img.size
    if width < 1 or height < 1:
        raise NotAnImage("image has no pixels")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}"
        )
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # first frame of an animation
        if min_side and fmt in ("JPEG", "MPO"):
            img.draft(None, (min_side, min_side))
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise NotAnImage(f"corrupt or truncated image: {e}") from e
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: PIL's convert clips at 255, so scale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode != "F" else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def is_image_path(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in SUFFIXES and not path.name.startswith(".")
