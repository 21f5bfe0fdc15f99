"""The ``imagefinder`` command. Each subcommand is a thin shell over the package."""

from __future__ import annotations

import click

from .. import __version__
from .base import CONTEXT
from .catalogue import download, extract
from .duplicates import duplicates
from .index import copy, evaluate, info, search, serve
from .ingest import ingest

__all__ = ["cli", "download", "extract", "ingest", "main"]


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="imagefinder")
def cli() -> None:
    """ImageFinder: find the catalogue images that look most like a photo.

    Typical use: `imagefinder download --csv_file images.csv`, then
    `imagefinder extract --folder data/images`, then `imagefinder serve`.
    """


for _command in (download, extract, ingest, search, duplicates, info, evaluate, copy, serve):
    cli.add_command(_command)


def main() -> None:
    cli()
