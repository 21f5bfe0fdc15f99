"""What an anonymous client may read in a message: no filesystem paths, no credentials.

Errors raised deep inside name files and database URLs as the operator configured
them, which is what the CLI and the server log should say. Public HTTP answers pass
through ``redact`` instead: each configured path becomes its public form, every
PostgreSQL URL loses its credentials and host parameters, and any other absolute path
keeps only its last component (``.../name``).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

from .config import Settings
from .store.base import display_location, is_postgres, public_location

_PG_URL = re.compile(r"postgres(?:ql)?://[^\s'\"]+")
# An absolute POSIX path of at least two components, or a Windows drive path; not the
# path part of a URL (preceded by a word character, ':' or '/').
_ABSOLUTE = re.compile(
    r"(?<![\w.:/\\~-])(?:[A-Za-z]:\\|/)(?:[^\s'\"/\\:,;()]+[/\\])+([^\s'\"/\\:,;()]*)"
)
# libpq keyword form: password=secret
_KEYWORD_SECRET = re.compile(r"\b(password|sslpassword|passfile|sslkey)\s*=\s*('[^']*'|\S+)", re.I)


def public_path(path: str | Path) -> str:
    """A configured path as a public message may show it: as configured if relative and
    inside the working folder, else ``.../<name>``."""
    text = str(path)
    pure = PurePath(text)
    if not pure.is_absolute() and ".." not in pure.parts and not text.startswith("~"):
        return text
    return f".../{pure.name}" if pure.name else "..."


def redact(message: str, settings: Settings | None = None) -> str:
    """``message`` with no absolute path and no credential in it."""
    text = message
    if settings is not None:
        for raw, shown in _known(settings):
            if raw:
                text = text.replace(raw, shown)
    text = _PG_URL.sub(lambda m: public_location(m.group(0)), text)
    text = _KEYWORD_SECRET.sub(lambda m: f"{m.group(1)}=***", text)
    return _ABSOLUTE.sub(lambda m: f".../{m.group(1)}" if m.group(1) else "...", text)


def _known(settings: Settings) -> list[tuple[str, str]]:
    """(as it may appear in a message, public form), longest first."""
    pairs: list[tuple[str, str]] = []
    locations = [location for _, location in settings.indexes]
    for location in locations:
        if is_postgres(location):
            shown = public_location(location)
            pairs += [(location, shown), (display_location(location), shown)]
    for value in (*locations, settings.images_dir, settings.weights, settings.thumbs_dir):
        if not value or is_postgres(value):
            continue
        shown = public_path(value)
        pairs.append((value, shown))
        try:
            pairs.append((str(Path(value).expanduser().resolve()), shown))
            pairs.append((str(Path(value).absolute()), shown))
        except (OSError, RuntimeError):
            pass
    return sorted({p for p in pairs if p[0] != p[1]}, key=lambda p: -len(p[0]))
