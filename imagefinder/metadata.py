"""Image metadata: string columns beside each image (``category``, ``brand``, ``price``),
the rules for their names and values, search filters over them, and the sidecar file
that carries them from the catalogue CSV to the index.

Metadata comes from the catalogue CSV's columns beyond ``url,id`` (``download`` writes
them to ``metadata.csv`` beside the images, ``extract`` reads that file), or from the
fields of ``POST /images``. Values are strings, compared exactly: ``price=9.90`` does
not match ``9.9``. An empty cell means "no value" and is not stored.

A filter is one or more ``column=value`` pairs, all of which must hold (AND).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import CatalogError, InvalidRequest

# The file ``download`` writes beside the images and ``extract`` reads from the folder.
SIDECAR = "metadata.csv"
# Columns that are the catalogue's own, never metadata.
RESERVED = frozenset({"url", "id"})
MAX_NAME = 64
MAX_VALUE = 1000
# Columns per image and pairs per filter: bounds on what one request can make the
# database do.
MAX_FIELDS = 64
MAX_FILTERS = 8

Metadata = dict[str, str]
# A filter: (column, value) pairs, sorted, each column once.
Where = tuple[tuple[str, str], ...]


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a metadata column, or None if it can."""
    if not name:
        return "empty column name"
    if len(name) > MAX_NAME:
        return f"column name {name[:20]!r}... is longer than {MAX_NAME} characters"
    if "=" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"column name {name[:40]!r} contains '=' or a control character"
    if name.lower() in RESERVED:
        return f"{name!r} is the catalogue's own column, not metadata"
    return None


def value_problem(name: str, value: str) -> str | None:
    if len(value) > MAX_VALUE:
        return f"the value of {name!r} is longer than {MAX_VALUE} characters"
    if "\x00" in value:
        return f"the value of {name!r} contains a NUL byte"
    return None


def clean(fields: Mapping[str, str], where: str = "metadata") -> Metadata:
    """``fields`` as stored metadata: names and values trimmed, empty values dropped;
    an InvalidRequest naming the first field that breaks a rule."""
    if len(fields) > MAX_FIELDS:
        raise InvalidRequest(f"{where}: {len(fields)} columns, at most {MAX_FIELDS}")
    out: Metadata = {}
    for raw_name, raw_value in fields.items():
        name, value = raw_name.strip(), str(raw_value).strip()
        problem = name_problem(name) or value_problem(name, value)
        if problem:
            raise InvalidRequest(f"{where}: {problem}")
        if value:
            out[name] = value
    return out


def parse_filter(pairs: Iterable[str]) -> Where:
    """``["category=shoes", "brand=acme"]`` -> the filter; InvalidRequest on a pair that
    is not ``column=value`` or a column named twice."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise InvalidRequest(
                f"filter {pair[:60]!r} is not column=value; write e.g. filter=category=shoes"
            )
        problem = name_problem(name) or value_problem(name, value)
        if problem:
            raise InvalidRequest(f"filter: {problem}")
        if name in found and found[name] != value:
            raise InvalidRequest(
                f"filter names {name!r} twice; pairs are combined with AND, so an image "
                "matches one value per column"
            )
        found[name] = value
    if len(found) > MAX_FILTERS:
        raise InvalidRequest(f"filter has {len(found)} pairs, at most {MAX_FILTERS}")
    return tuple(sorted(found.items()))


def matches(metadata: Mapping[str, str], where: Where) -> bool:
    return all(metadata.get(name) == value for name, value in where)


# -- columns of a CSV ----------------------------------------------------------------


def metadata_columns(header: Sequence[str], name: str) -> dict[int, str]:
    """The metadata columns of a CSV header, by position: every column but ``url`` and
    ``id`` (unnamed columns, a spreadsheet's trailing commas, are ignored). A
    CatalogError naming line 1 if a name breaks a rule or repeats."""
    out: dict[int, str] = {}
    for position, raw in enumerate(header):
        column = raw.strip()
        if not column or column.lower() in RESERVED:
            continue
        problem = name_problem(column)
        if problem:
            raise CatalogError(f"{name}:1: {problem}")
        if column in out.values():
            raise CatalogError(f"{name}:1: column {column!r} appears twice")
        out[position] = column
    if len(out) > MAX_FIELDS:
        raise CatalogError(f"{name}:1: {len(out)} metadata columns, at most {MAX_FIELDS}")
    return out


def row_metadata(record: Sequence[str], columns: Mapping[int, str]) -> tuple[Metadata, str | None]:
    """One CSV record's metadata, and the problem with it, if any."""
    out: Metadata = {}
    for position, column in columns.items():
        value = record[position].strip() if position < len(record) else ""
        problem = value_problem(column, value)
        if problem:
            return {}, problem
        if value:
            out[column] = value
    return out, None


# -- the sidecar --------------------------------------------------------------------


def write_sidecar(
    path: str | Path, columns: Sequence[str], rows: Iterable[tuple[str, Metadata]]
) -> None:
    """Write ``id,<columns>`` rows to ``path`` atomically (temp file and rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *columns])
        for image_id, metadata in rows:
            writer.writerow([image_id, *(metadata.get(c, "") for c in columns)])
    os.replace(tmp, path)


def read_sidecar(path: str | Path) -> tuple[str, dict[str, Metadata], list[tuple[str, str]]]:
    """A metadata file: a CSV with an ``id`` column (a ``url`` column is ignored, so the
    catalogue CSV itself will do). Returns its content hash, each id's metadata, and the
    rows refused (``path:line``, reason)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CatalogError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CatalogError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise CatalogError(f"{path}: empty file; expected a header with an 'id' column") from None
    except csv.Error as e:
        raise CatalogError(f"{path}:1: {e}") from None
    lowered = [h.strip().lower() for h in header]
    if "id" not in lowered:
        raise CatalogError(f"{path}:1: no 'id' column; the first line names the columns")
    id_col = lowered.index("id")
    columns = metadata_columns(header, str(path))
    rows: dict[str, Metadata] = {}
    refused: list[tuple[str, str]] = []
    try:
        for record in reader:
            if len(record) <= id_col or not record[id_col].strip():
                continue
            metadata, problem = row_metadata(record, columns)
            if problem is None:
                rows[record[id_col].strip()] = metadata
            else:
                refused.append((f"{path}:{reader.line_num}", problem))
    except csv.Error as e:
        raise CatalogError(f"{path}:{reader.line_num}: {e}") from None
    return hashlib.sha256(data).hexdigest(), rows, refused
