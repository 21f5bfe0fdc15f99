"""Using an index: ``search`` it, show its ``info``, ``eval``uate it, ``copy`` it, ``serve`` it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .base import command, db_option, load_settings, open_index
from .progress import Progress


@command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@db_option
@click.option(
    "--server",
    metavar="URL",
    help="Ask a running server (e.g. http://127.0.0.1:8000) instead of loading the "
    "model here: no torch import, no weights to load.",
)
@click.option(
    "-k", default=3, show_default=True, type=click.IntRange(1, 100), help="How many neighbours."
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON response.")
def search(image: str, db: str | None, server: str | None, k: int, as_json: bool) -> None:
    """Find the indexed images nearest to IMAGE."""
    if server:
        if db:
            raise click.UsageError(
                "--db and --server exclude each other: a server searches its own index"
            )
        from ..client import search as ask_server

        body = ask_server(server, Path(image), k)
        results = [(str(r["id"]), float(r["distance"])) for r in body["results"]]
    else:
        from ..service import Service
        from ..store import open_store

        settings = load_settings(db=db)
        store = open_store(
            settings.db, ef_search=settings.ef_search, exact=settings.exact, create=False
        )
        service = Service(settings, store)
        results = service.search_bytes(Path(image).read_bytes(), k)
        body = service.response(results)
    if as_json:
        click.echo(json.dumps(body, indent=2))
    else:
        for image_id, distance in results:
            click.echo(f"{distance:.4f}  {image_id}")


@command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(db: str | None, as_json: bool) -> None:
    """Show what an index holds: model, dimension, metric, count."""
    settings = load_settings(db=db)
    store = open_index(settings.db, settings)
    meta = store.meta()
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

    settings = load_settings(db=db)
    store = open_index(settings.db, settings)
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

    source, target = open_index(src), open_store(dst)
    with Progress("Copying") as progress:
        copied = copy_index(
            source, target, batch=batch_size, on_total=progress.total, on_progress=progress.update
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
    from ..server.logs import uvicorn_log_config

    settings = load_settings(db=db)
    app = create_app(settings)
    # uvicorn's lines in the configured format; its access log gives way to the request
    # line of server/observe.py.
    uvicorn.run(
        app, host=host, port=port, log_config=uvicorn_log_config(settings), access_log=False
    )
