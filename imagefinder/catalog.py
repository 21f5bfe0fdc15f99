"""The catalogue CSV (``url,id``) and the rules for ids.

Ids become file names (``<id>.<ext>``) and URL path segments, so they are held to
a conservative pattern instead of being sanitised: a rejected id is reported, never
silently renamed.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import CatalogError
from .metadata import Metadata, metadata_columns, row_metadata

MAX_ID_LENGTH = 128
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
ALLOWED_SCHEMES = ("http", "https")


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` is not a safe id, or None if it is."""
    if not image_id:
        return "empty id"
    if len(image_id) > MAX_ID_LENGTH:
        return f"id longer than {MAX_ID_LENGTH} characters"
    if not _ID_RE.fullmatch(image_id):
        return (
            f"id {image_id[:40]!r} is not safe as a file name: use letters, digits, "
            "'_', '-' and '.', not starting with '.' or '-'"
        )
    return None


_URL_CONTROL = re.compile("[\x00-\x1f\x7f]")


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be downloaded, or None if it can."""
    if not url:
        return "empty url"
    if _URL_CONTROL.search(url):
        return "url contains a control character (a NUL byte, tab or line break)"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return f"malformed url: {e}"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"unsupported url scheme {parts.scheme or '(none)'!r}: only http and https"
    if not parts.hostname:
        return "url has no host"
    return None


# Characters that make a terminal or a spreadsheet do something: C0 and C1 controls and
# DEL (escape sequences clear a screen and print a fake line), and Unicode's bidirectional
# overrides and line separators (they reorder or split what is shown).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
# A cell starting with one of these is a formula to Excel, LibreOffice and Sheets.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``) instead of
    acted on: for anything printed to a terminal or written to a manifest. Escaped
    rather than dropped, so what a server sent stays visible."""
    return _CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)


def spreadsheet_safe(cell: str) -> str:
    """A CSV cell a spreadsheet shows as text, never runs: one that would start a formula
    gets a leading apostrophe (OWASP's advice), and controls are escaped."""
    if cell.startswith(_FORMULA_START):
        cell = "'" + cell
    return printable(cell)


@dataclass(frozen=True)
class Row:
    line: int
    url: str
    id: str
    problem: str | None = None
    # The row's values in the columns beyond url and id (metadata.py).
    metadata: Metadata = field(default_factory=dict)


def read_catalog(path: str | Path) -> list[Row]:
    """Read a ``url,id`` CSV (any further columns are the images' metadata). Rows that
    cannot be used carry a ``problem``.

    A UTF-8 BOM and CRLF line endings (what spreadsheets write) are accepted.
    Raises CatalogError when the file as a whole is unusable.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CatalogError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_catalog(data, name=str(path))


def catalog_columns(data: bytes, name: str = "<csv>") -> list[str]:
    """The metadata columns of a catalogue, in the header's order."""
    header = next(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")), [])
    return list(metadata_columns(header, name).values())


def parse_catalog(data: bytes, name: str = "<csv>") -> list[Row]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CatalogError(
            f"{name}: not UTF-8 text (byte {e.start}); save the CSV as UTF-8"
        ) from None
    # NULs in the header mean UTF-16 or a binary file; NULs in a row are that row's
    # problem (id_problem and url_problem refuse them).
    if "\x00" in text.split("\n", 1)[0]:
        raise CatalogError(
            f"{name}:1: contains NUL bytes; is this a CSV saved as UTF-16, or not a CSV? "
            "Save it as UTF-8"
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise CatalogError(f"{name}: empty file; expected a header line 'url,id'") from None
    except csv.Error as e:
        raise CatalogError(f"{name}:1: {e}") from None
    columns = [h.strip().lower() for h in header]
    missing = [c for c in ("url", "id") if c not in columns]
    if missing:
        raise CatalogError(
            f"{name}:1: header is {','.join(header)!r}, missing column(s) "
            f"{', '.join(missing)}; the first line must be 'url,id'"
        )
    url_col, id_col = columns.index("url"), columns.index("id")
    extra = metadata_columns(header, name)

    rows: list[Row] = []
    seen: dict[str, int] = {}
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise CatalogError(f"{name}:{reader.line_num}: {e}") from None
        line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if len(record) <= max(url_col, id_col):
            rows.append(Row(line, "", "", f"expected {len(columns)} columns, got {len(record)}"))
            continue
        url, image_id = record[url_col].strip(), record[id_col].strip()
        metadata, metadata_problem = row_metadata(record, extra)
        problem = id_problem(image_id) or url_problem(url) or metadata_problem
        if problem is None and image_id in seen:
            problem = f"duplicate id {image_id!r} (first on line {seen[image_id]})"
        if problem is None:
            seen[image_id] = line
        rows.append(Row(line, url, image_id, problem, metadata))
    return rows
