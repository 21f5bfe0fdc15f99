"""What every command shares: one-line errors, ``-h``, the ``--db`` option, settings."""

from __future__ import annotations

from typing import Any

import click

from ..config import Settings
from ..errors import ImageFinderError

CONTEXT = {"help_option_names": ["-h", "--help"]}


class Command(click.Command):
    """A command whose ImageFinder errors print as one line (``Error: ...``), exit 1.

    Also the class of the scripts in the project root, which run a command on its own:
    so ``-h`` works there too, not only under the ``imagefinder`` group."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["context_settings"] = {**CONTEXT, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ImageFinderError as e:
            raise click.ClickException(e.message) from e


def command(**kwargs: Any) -> Any:
    """``@command()``: a ``click.command`` of class ``Command``."""
    return click.command(cls=Command, **kwargs)


# Options shared by commands that open an index.
db_option = click.option(
    "--db",
    help="Index: a SQLite file, or a postgresql:// URL "
    "(default: $IMAGEFINDER_DB or data/imagefinder.db).",
)


def load_settings(**overrides: Any) -> Settings:
    """``IMAGEFINDER_*`` settings with the command's options on top."""
    return Settings.from_env(**overrides)
