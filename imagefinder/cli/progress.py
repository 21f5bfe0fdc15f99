"""Progress of long commands: a bar on a terminal; in a log or a pipe, only the messages
and the closing summary (a bar there is a dangling label and blank lines)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

import click

from ..catalog import printable

# Return to column 0 and erase the line: a message then replaces the bar instead of
# being glued to it; the next update draws the bar again below the message.
ERASE_LINE = "\r\x1b[K"


class Progress:
    """``with Progress("Embedding") as p: p.total(n); p.update(1); p.note("skipping ...")``"""

    def __init__(self, label: str, length: int = 0):
        self.file = sys.stderr
        self.tty = self.file.isatty()
        self.bar: Any = click.progressbar(
            length=length, label=label, file=self.file, hidden=not self.tty
        )

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bar.__exit__(exc_type, exc, tb)

    def total(self, length: int) -> None:
        self.bar.length = length

    def update(self, steps: int) -> None:
        self.bar.update(steps)

    def note(self, message: str) -> None:
        """One line on stderr (``skipping ...``), never mixed into the bar. Ids, urls and
        reasons come from catalogues and servers: control characters are shown escaped,
        so no escape sequence reaches the terminal."""
        if self.tty:
            self.file.write(ERASE_LINE)
        click.echo(printable(message), file=self.file)
