"""What every command shares: one-line errors, ``-h``, the ``--db`` option, settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..config import Settings
from ..errors import ImageFinderError

if TYPE_CHECKING:
    from ..store import Store

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


def open_index(location: str, settings: Settings | None = None) -> Store:
    """An index that exists, for commands that only read it. A mistyped ``--db`` is
    one line of error; it never leaves an empty index file behind."""
    from ..store import display_location, open_store

    settings = settings or Settings()
    store = open_store(
        location,
        ef_search=settings.ef_search,
        exact=settings.exact,
        nprobe=settings.nprobe,
        create=False,
    )
    if not store.meta():
        store.close()
        shown = display_location(location)
        raise click.ClickException(
            f"{shown} is not an index yet; build one with: "
            f"imagefinder extract --folder DIR --db {shown}"
        )
    return store
