"""Using an index: ``search`` it, show its ``info``, ``eval``uate it, ``copy`` it, ``serve`` it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .base import command, db_option, load_settings


@command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@db_option
@click.option(
    "-k", default=3, show_default=True, type=click.IntRange(1, 100), help="How many neighbours."
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON response.")
def search(image: str, db: str | None, k: int, as_json: bool) -> None:
    """Find the indexed images nearest to IMAGE."""
    from ..service import Service

    service = Service(load_settings(db=db))
    results = service.search_bytes(Path(image).read_bytes(), k)
    if as_json:
        click.echo(json.dumps(service.response(results), indent=2))
    else:
        for image_id, distance in results:
            click.echo(f"{distance:.4f}  {image_id}")


@command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(db: str | None, as_json: bool) -> None:
    """Show what an index holds: model, dimension, metric, count."""
    from ..store import open_store

    settings = load_settings(db=db)
    store = open_store(settings.db)
    meta = store.meta()
    if not meta:
        raise click.ClickException(
            f"{settings.db} is not an index yet; build one with: "
            f"imagefinder extract --folder DIR --db {settings.db}"
        )
    data = {"index": store.location, "vectors": store.count(), **meta}
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        width = max(len(key) for key in data)
        for key, value in data.items():
            click.echo(f"{key:<{width}}  {value}")


@command(name="eval")
@click.option(
    "--folder",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder with one sub-folder per class, already indexed.",
)
@db_option
@click.option(
    "-k", default=3, show_default=True, type=click.IntRange(1, 100), help="Cut-off for precision@k."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def evaluate(folder: str, db: str | None, k: int, as_json: bool) -> None:
    """Leave-one-out precision@k and mAP of an index over a labelled folder."""
    from ..evaluate import evaluate_index
    from ..store import open_store

    settings = load_settings(db=db)
    store = open_store(
        settings.db, ef_search=settings.ef_search, exact=settings.exact, nprobe=settings.nprobe
    )
    report = evaluate_index(store, folder, k)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{report['queries']} queries over {report['classes']} classes: "
            f"precision@{k} = {report['precision_at_k']:.4f}, mAP = {report['map']:.4f}"
        )


@command()
@click.argument("src")
@click.argument("dst")
@click.option(
    "--batch-size",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Rows per transaction.",
)
def copy(src: str, dst: str, batch_size: int) -> None:
    """Copy the index SRC into DST (each a SQLite file or a postgresql:// URL).

    Vectors and meta are copied exactly; a DST that already exists must hold the
    same model, and rows with the same id are replaced.
    """
    from ..store import open_store
    from ..store.transfer import copy_index

    source, target = open_store(src), open_store(dst)
    bar: Any
    with click.progressbar(length=0, label="Copying", file=sys.stderr) as bar:

        def on_total(n: int) -> None:
            bar.length = n

        copied = copy_index(
            source, target, batch=batch_size, on_total=on_total, on_progress=bar.update
        )
    total = target.count()
    source.close()
    target.close()
    click.echo(f"{copied} images copied; {target.location} now holds {total} images")


@command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
def serve(db: str | None, host: str, port: int) -> None:
    """Serve the HTTP API (same as `uvicorn main:app`)."""
    import uvicorn

    from ..server.app import create_app

    uvicorn.run(create_app(load_settings(db=db)), host=host, port=port)
