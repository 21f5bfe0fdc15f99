"""What decoding an image will cost, read from its header before any pixel is decoded.

A small file can ask a decoder for far more memory or CPU than its size suggests:
a 38-byte lossless WebP declares 100 million pixels, a 16 KB progressive JPEG can
repeat one scan thousands of times, each a pass over every block. ``images.py``
asks this module what a decode would cost and refuses what is over budget.

The memory budget is ``BYTES_PER_PIXEL * max_pixels`` (plus a little slack): what a plain RGB(A) decode of
an image at the pixel cap needs in Pillow (4 bytes a pixel). Decoders that need more
per pixel (WebP's animation decoder, progressive JPEG's coefficient buffers, TIFF's
strip buffers) therefore get fewer pixels; JPEGs decoded at a reduced DCT scale
need far less.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from PIL import Image

from .errors import TooComplex

BYTES_PER_PIXEL = 4
# Beyond the pixels: a decoder's row and strip buffers, the file's own bytes.
SLACK_BYTES = 16 << 20
# A JPEG is a list of marker segments (tables, metadata, scans). Real files have a few
# dozen; Pillow parses each header segment in Python, so millions of empty ones cost
# seconds before a pixel is decoded.
MAX_JPEG_SEGMENTS = 2000
# libjpeg's default progression has 10 scans, optimised encoders about 20.
MAX_JPEG_SCANS = 200
# Each scan of a multi-scan JPEG is a pass over every block of its components, however
# few bytes it takes (runs of empty blocks cost one symbol). A progressive 4:4:4 photo
# at the pixel cap makes about 15 block visits per 64 pixels; 3x that is allowed.
SCAN_VISITS_PER_PIXEL = 0.75
# Pillow's bytes per pixel, by mode, for what is not 4.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# WebP decodes through libwebp's animation decoder: two full canvases, then a copy of
# the frame as bytes, then the image Pillow builds from them.
_WEBP_BYTES = 16
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
# The next marker after entropy-coded data: 0xFF not followed by a stuffed 0x00, a
# restart marker or another fill 0xFF.
_NEXT_MARKER = re.compile(rb"\xff+(?=[^\x00\xd0-\xd7\xff])")


@dataclass(frozen=True)
class JpegLayout:
    width: int
    height: int
    components: dict[int, tuple[int, int]]  # id -> (horizontal, vertical) sampling
    scans: list[tuple[int, ...]]  # the component ids each scan covers
    lossless: bool

    def mcus(self) -> int:
        hmax = max(h for h, _ in self.components.values())
        vmax = max(v for _, v in self.components.values())
        return math.ceil(self.width / (8 * hmax)) * math.ceil(self.height / (8 * vmax))

    def blocks(self, ids: tuple[int, ...]) -> int:
        """Blocks of ``ids``' components in the whole image."""
        mcus = self.mcus()
        return sum(mcus * h * v for c, (h, v) in self.components.items() if c in ids)

    def scan_visits(self) -> int:
        return sum(self.blocks(ids) for ids in self.scans)

    def coefficient_bytes(self) -> int:
        """libjpeg keeps every coefficient (64 x 2 bytes a block) of a multi-scan image."""
        if len(self.scans) <= 1 or self.lossless:
            return 0
        return self.blocks(tuple(self.components)) * 128


# Pillow walks PNG chunks and GIF blocks in Python, a few microseconds each: a 20 MB
# file of empty ones took 4 s. Real files have a few dozen before their pixels and, with
# IDAT split into 8 KB chunks, a few thousand in all.
MAX_PNG_CHUNKS = 20_000
MAX_GIF_BLOCKS = 20_000


def is_jpeg(head: bytes) -> bool:
    return head[:3] == b"\xff\xd8\xff"


def needs_walk(head: bytes) -> bool:
    """Whether ``check_structure`` has something to walk in a file starting with ``head``."""
    return is_jpeg(head) or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:4] == b"GIF8"


def check_structure(data: bytes, max_pixels: int) -> JpegLayout | None:
    """Walk the container of a JPEG, PNG or GIF (cheaply, in large steps) and refuse one
    whose segment, chunk or block counts would make its decoder crawl. Returns a JPEG's
    layout for ``decode_bytes``."""
    if is_jpeg(data):
        return jpeg_layout(data, max_pixels)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png(data)
    elif data[:4] == b"GIF8":
        _check_gif(data)
    return None


def _check_png(data: bytes) -> None:
    at, chunks = 8, 0
    while at + 8 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise TooComplex(f"PNG with over {MAX_PNG_CHUNKS:,} chunks")
        if kind == b"IEND":
            return
        at += 12 + length


def _check_gif(data: bytes) -> None:
    """Count the blocks and sub-blocks before the first picture (all Pillow reads)."""
    if len(data) < 13:
        return
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    blocks = 0
    while at < len(data) and data[at] == 0x21:  # extensions, each a run of sub-blocks
        at += 2
        while at < len(data):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise TooComplex(f"GIF with over {MAX_GIF_BLOCKS:,} blocks before its picture")
            size = data[at]
            at += 1 + size
            if size == 0:
                break


def jpeg_layout(data: bytes, max_pixels: int) -> JpegLayout | None:
    """Walk a JPEG's markers up to the end of its first image (an MPO's next pictures,
    or bytes appended after EOI, are never decoded). Raises ``TooComplex`` for too many
    segments, scans or block visits; None if there is no frame header to read (the
    decoder then says what is wrong)."""
    n = len(data)
    i, segments = 2, 0
    frame: tuple[int, int, dict[int, tuple[int, int]], bool] | None = None
    scans: list[tuple[int, ...]] = []
    while i + 4 <= n:
        if data[i] != 0xFF:  # stray bytes between segments: libjpeg skips them too
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise TooComplex(f"JPEG with over {MAX_JPEG_SEGMENTS:,} marker segments")
        if marker in _SOF and frame is None and len(segment) >= 6:
            frame = _frame(segment, marker in _LOSSLESS)
        elif marker == 0xDA and segment:
            count = segment[0]
            scans.append(tuple(segment[1 : 1 + 2 * count : 2]))
            if len(scans) > MAX_JPEG_SCANS:
                raise TooComplex(f"progressive JPEG with over {MAX_JPEG_SCANS} scans")
            found = _NEXT_MARKER.search(data, i + 2 + length)
            if found is None:
                break
            i = found.end() - 1
            continue
        i += 2 + length
    if frame is None:
        return None
    width, height, components, lossless = frame
    if not components or width < 1 or height < 1:
        return None
    layout = JpegLayout(width, height, components, scans, lossless)
    allowed = int(SCAN_VISITS_PER_PIXEL * max_pixels)
    if len(scans) > 1 and layout.scan_visits() > allowed:
        raise TooComplex(
            f"JPEG whose {len(scans)} scans make {layout.scan_visits():,} block decodes, "
            f"over the limit of {allowed:,}"
        )
    return layout


def _frame(segment: bytes, lossless: bool) -> tuple[int, int, dict[int, tuple[int, int]], bool]:
    height = int.from_bytes(segment[1:3], "big")
    width = int.from_bytes(segment[3:5], "big")
    count = segment[5]
    components = {}
    for k in range(count):
        at = 6 + 3 * k
        if at + 3 > len(segment):
            break
        sampling = segment[at + 1]
        components[segment[at]] = (max(1, sampling >> 4), max(1, sampling & 15))
    return width, height, components, lossless


def jpeg_scale(size: tuple[int, int], min_side: int) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's ``draft`` picks to keep both sides at least
    ``min_side`` (1: the smallest picture, for a decode that only checks the data)."""
    fits = min(size[0] // min_side, size[1] // min_side)
    return next(s for s in (8, 4, 2, 1) if s <= max(1, fits))


def decode_bytes(img: Image.Image, layout: JpegLayout | None, scale: int) -> int:
    """Peak bytes the decoder holds for ``img`` (opened, not loaded) at ``scale``."""
    w, h = img.size
    fmt = img.format
    if fmt in ("JPEG", "MPO"):
        if layout is not None and layout.lossless:
            return w * h * BYTES_PER_PIXEL  # lossless JPEGs have no reduced scales
        out = math.ceil(w / scale) * math.ceil(h / scale) * BYTES_PER_PIXEL
        return out + (layout.coefficient_bytes() if layout else 0)
    if fmt == "WEBP":
        return w * h * _WEBP_BYTES
    decoded = w * h * _MODE_BYTES.get(img.mode, 4)
    if fmt == "TIFF":
        decoded += _tiff_chunk_bytes(img)
    if fmt == "BMP" and img.info.get("compression") in (1, 2):
        decoded += 2 * w * h  # Pillow's run-length decoder builds two copies in Python
    return decoded


def _tiff_chunk_bytes(img: Image.Image) -> int:
    """libtiff reads a compressed TIFF a strip or tile at a time into its own buffer;
    one strip may be the whole image, at up to 16 bytes a pixel."""
    tags = getattr(img, "tag_v2", {})
    w, h = img.size
    bits = tags.get(258, 8)
    per_pixel = sum(bits) if isinstance(bits, tuple) else int(bits) * int(tags.get(277, 1))
    if 322 in tags and 323 in tags:
        pixels = int(tags[322]) * int(tags[323])
    else:  # RowsPerStrip defaults to the whole image
        pixels = w * min(h, int(tags.get(278, h) or h))
    return pixels * math.ceil(per_pixel / 8)
