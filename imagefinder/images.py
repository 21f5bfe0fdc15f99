"""Safe image decoding: the only place that turns bytes or files into pixels.

Whether something is an image is decided from its bytes, never from its name.
Everything that reaches a model is an RGB ``PIL.Image`` with EXIF orientation
applied, decoded under a pixel cap.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Formats we decode. Restricting Image.open keeps exotic plugins (EPS calls
# Ghostscript, for one) away from untrusted uploads.
# MPO (multi-picture JPEGs from phones) opens through the JPEG plugin.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}
# Suffixes that the extractor treats as images (their content is still checked).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}

# Register every plugin now: Image.open(formats=...) only looks at loaded ones.
Image.init()
# Truncated files must fail, not decode half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own, configurable cap before decoding; PIL's would fire first
# with a less helpful message for caps above its default.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The input cannot be used as an image. ``status`` is the HTTP status to report."""

    status = 400
    code = "not_an_image"


class NotAnImage(ImageError):
    pass


class TooManyPixels(ImageError):
    status = 413
    code = "too_many_pixels"


Source = bytes | str | Path | BinaryIO


def _open(source: Source) -> Image.Image:
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp, formats=FORMATS)
    except FileNotFoundError:
        raise
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise NotAnImage(f"not a supported image ({', '.join(FORMATS)})") from e
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
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
