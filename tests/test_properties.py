"""Property-based tests of the two parsers that meet untrusted bytes first:
the catalogue CSV (``parse_catalog``) and the image decoder (``load_rgb``).

Whatever the input, each may only fail in its own documented way (CatalogError,
ImageError), which the CLI and the API turn into one clear line or a 4xx.
"""

from __future__ import annotations

import csv
import io
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagefinder.catalog import MAX_ID_LENGTH, CatalogError, id_problem, parse_catalog
from imagefinder.images import ImageError, load_rgb

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_PIXELS = 4_000_000


def csv_bytes(rows: list[list[str]], header: tuple[str, ...] = ("url", "id")) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def parse_or_refuse(data: bytes):
    try:
        return parse_catalog(data)
    except CatalogError as e:
        assert str(e), "a refused CSV must say why"
        return None


# -- the catalogue CSV ------------------------------------------------------------

ALNUM = string.ascii_letters + string.digits
safe_ids = st.builds(str.__add__, st.sampled_from(ALNUM + "_"), st.text(ALNUM + "_.-", max_size=40))
hosts = st.builds(
    "{}.{}".format,
    st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20),
    st.sampled_from(["com", "org", "example", "co.uk"]),
)
paths = st.lists(st.text(ALNUM + "_.~%-", max_size=12), max_size=4).map(
    lambda parts: "".join("/" + p for p in parts)
)
urls = st.builds(
    lambda scheme, host, path: f"{scheme}://{host}{path}",
    st.sampled_from(["http", "https", "HTTPS"]),
    hosts,
    paths,
)


@FAST
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_catalog_error(data):
    parse_or_refuse(data)


@FAST
@given(
    st.lists(
        st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=30), max_size=4),
        max_size=8,
    ),
    st.sampled_from([("url", "id"), ("id", "url"), ("URL", " Id ", "extra"), ("url",)]),
)
def test_any_rows_parse_or_raise_catalog_error(rows, header):
    parsed = parse_or_refuse(csv_bytes(rows, header))
    if parsed is None:
        return
    for row in parsed:
        # A row without a problem is safe to act on: its id can be a file name,
        # its url can be fetched.
        if row.problem is None:
            assert id_problem(row.id) is None
            assert row.url.lower().startswith(("http://", "https://"))


@FAST
@given(st.lists(st.tuples(urls, safe_ids), max_size=12, unique_by=lambda r: r[1]))
def test_valid_rows_round_trip(rows):
    parsed = parse_catalog(csv_bytes([list(r) for r in rows]))
    assert [(r.url, r.id, r.problem) for r in parsed] == [(u, i, None) for u, i in rows]
    # Line numbers are the CSV's own (header is line 1), for one-line error messages.
    assert [r.line for r in parsed] == list(range(2, len(rows) + 2))


bad_ids = st.one_of(
    st.sampled_from(["../../x", "/etc/passwd", ".hidden", "-rf", "a/b", "a\\b", "x\x00y"]),
    st.text(min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 40).filter(str.strip),
    st.text(st.characters(categories=["Zs", "Cc", "So"]), min_size=1, max_size=5).filter(str.strip),
)
bad_urls = st.one_of(
    st.sampled_from(
        [
            "file:///etc/passwd",
            "ftp://example.com/a.jpg",
            "javascript:alert(1)",
            "data:image/png;base64,AAAA",
            "http://",
            "//example.com/a.jpg",
            "example.com/a.jpg",
            "http://exa\x00mple.com/a.jpg",
            "http://example.com/a\nb.jpg",
            "https://example.com/\ta.jpg",
        ]
    ),
)


@FAST
@given(
    st.lists(
        st.one_of(
            st.tuples(urls, safe_ids, st.just("ok")),
            st.tuples(urls, bad_ids, st.just("bad id")),
            st.tuples(bad_urls, safe_ids, st.just("bad url")),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_every_problem_row_has_a_reason(rows):
    parsed = parse_catalog(csv_bytes([[u, i] for u, i, _ in rows]))
    assert len(parsed) == len(rows)
    seen: set[str] = set()
    for row, (_, image_id, kind) in zip(parsed, rows, strict=True):
        if kind == "ok" and image_id not in seen:
            assert row.problem is None, row
            seen.add(image_id)
        else:  # a bad id, a bad url, or an id seen before
            assert row.problem and len(row.problem) > 5, row


# -- the image decoder -------------------------------------------------------------

FORMATS = ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]
MODES = {
    "JPEG": ["RGB", "L", "CMYK"],
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"],
    "GIF": ["P", "L"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["RGB", "L", "P", "1"],
    "TIFF": ["RGB", "RGBA", "L", "CMYK", "I;16", "F", "1"],
}


@st.composite
def encoded_images(draw) -> tuple[bytes, tuple[int, int]]:
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(MODES[fmt]))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    seed = draw(st.binary(min_size=16, max_size=16))
    # Pixel content from random bytes, tiled: real structure, not a flat block.
    rgb = Image.frombytes("RGB", (4, 4), (seed * 3)[:48]).resize(size, Image.Resampling.NEAREST)
    img = rgb.convert("P") if mode == "P" else rgb.convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        img = img.point(lambda v: v * 257).convert("I;16")
    buf = io.BytesIO()
    orientation = draw(st.integers(1, 8)) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else 1
    if orientation > 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, fmt, exif=exif.tobytes())
    else:
        img.save(buf, fmt)
    # Orientations 5-8 turn the picture a quarter: the upright view is h x w.
    return buf.getvalue(), size[::-1] if orientation >= 5 else size


@FAST
@given(encoded_images())
def test_valid_images_decode_to_rgb_of_their_size(image):
    data, size = image
    img = load_rgb(data, MAX_PIXELS)
    assert img.mode == "RGB"
    assert img.size == size


def decode_or_refuse(data: bytes) -> None:
    try:
        img = load_rgb(data, MAX_PIXELS, min_side=32)
    except ImageError as e:
        assert e.code in ("not_an_image", "too_many_pixels") and str(e)
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@FAST
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_image_error(data):
    decode_or_refuse(data)


@FAST
@given(encoded_images(), st.data())
def test_mutated_images_decode_or_raise_image_error(image, data):
    blob = bytearray(image[0])
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
        at = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if kind == "flip" and blob:
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[at:]
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:  # header fields are where sizes and offsets live: set one to an extreme
            blob[at : at + 4] = data.draw(st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0"]))
    decode_or_refuse(bytes(blob))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_survives_every_truncation(fmt):
    """Exhaustive, not sampled: each prefix of a small image of each format."""
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), (10, 200, 30)).save(buf, fmt)
    data = buf.getvalue()
    for end in range(len(data)):
        decode_or_refuse(data[:end])
