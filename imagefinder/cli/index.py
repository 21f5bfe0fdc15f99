"""Using an index: ``search`` it, show its ``info``, ``eval``uate it, ``copy`` it, ``serve`` it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..model.registry import MODELS
from .base import command, db_option, load_settings, open_index
from .progress import Progress


@command()
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--text", help="Search by a text instead of IMAGES (indexes of a text model).")
@db_option
@click.option(
    "--index", help="With several indexes in $IMAGEFINDER_DB: which one (default: the first)."
)
@click.option(
    "--server",
    metavar="URL",
    help="Ask a running server (e.g. http://127.0.0.1:8000) instead of loading the "
    "model here: no torch import, no weights to load.",
)
@click.option(
    "-k", default=3, show_default=True, type=click.IntRange(1, 100), help="How many neighbours."
)
@click.option(
    "--offset",
    default=0,
    show_default=True,
    type=click.IntRange(0, 999),
    help="Skip this many results (paging); k + offset <= 1000.",
)
@click.option(
    "--max-distance",
    type=click.FloatRange(0),
    help="Drop results farther than this L2 distance (0 = identical).",
)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="COLUMN=VALUE",
    help="Only images whose metadata has this value (repeat: all must hold).",
)
@click.option(
    "--expand/--no-expand",
    default=None,
    help="Query expansion, αQE (default: $IMAGEFINDER_EXPAND, on).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON response.")
def search(
    images: tuple[str, ...],
    text: str | None,
    db: str | None,
    index: str | None,
    server: str | None,
    k: int,
    offset: int,
    max_distance: float | None,
    filters: tuple[str, ...],
    expand: bool | None,
    as_json: bool,
) -> None:
    """Find the indexed images nearest to IMAGES, or best matching --text.

    Several IMAGES are searched as one ("more like these": the normalised mean of their
    vectors); those that are catalogue images are left out of the results.
    """
    from ..metadata import parse_filter

    if bool(images) == (text is not None):
        raise click.UsageError(
            "give either an IMAGE or --text, not both or neither (several IMAGEs are "
            "searched as one)"
        )
    where = parse_filter(filters)  # a bad filter fails here, before any model or request
    if server:
        if db:
            raise click.UsageError(
                "--db and --server exclude each other: a server searches its own indexes"
            )
        from ..client import search as ask_server

        body = ask_server(
            server,
            images=[Path(image) for image in images],
            text=text,
            k=k,
            index=index,
            expand=expand,
            offset=offset,
            max_distance=max_distance,
            filters=[f"{column}={value}" for column, value in where],
        )
    else:
        from ..indexes import Indexes
        from ..query import SearchOptions
        from ..service import Service
        from ..store import open_store

        settings = load_settings(db=db)
        # Only reading: a mistyped --db must not leave an empty index behind.
        services = [
            Service(
                settings,
                open_store(location, ef_search=settings.ef_search, exact=settings.exact,
                           nprobe=settings.nprobe, create=False),
                name=name,
                location=location,
            )
            for name, location in settings.indexes
        ]  # fmt: skip
        service = Indexes(settings, services).get(index)
        options = SearchOptions(
            k=k, expand=expand, offset=offset, max_distance=max_distance, where=where
        )
        if text is not None:
            found = service.search_text(text, options)
        else:
            found = service.search_uploads([Path(i).read_bytes() for i in images], options)
        body = service.response(found)
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    for r in body["results"]:
        mark = f"  [{r['match']}]" if r.get("match") else ""
        fields = " ".join(f"{key}={value}" for key, value in (r.get("metadata") or {}).items())
        click.echo(f"{float(r['distance']):.4f}  {r['id']}{mark}{'  ' + fields if fields else ''}")


@command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(db: str | None, as_json: bool) -> None:
    """Show what an index holds: model, dimension, metric, count."""
    from ..model.registry import embeds_text

    settings = load_settings(db=db)
    store = open_index(settings.location, settings)
    meta = store.meta()
    data = {
        "index": store.location,
        "vectors": store.count(),
        **meta,
        "text_search": "yes" if embeds_text(meta.get("model")) else "no",
        "dba": meta.get("dba", "off"),
    }
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
    help="Folder with one sub-folder per class.",
)
@db_option
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Choice(list(MODELS)),
    help="Embed the folder with this model into a temporary index and evaluate it, "
    "timing images/s (repeat for several). Without it: the index --db, as built.",
)
@click.option(
    "-k", default=3, show_default=True, type=click.IntRange(1, 100), help="Cut-off for precision@k."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def evaluate(folder: str, db: str | None, models: tuple[str, ...], k: int, as_json: bool) -> None:
    """Leave-one-out precision@k and mAP for each model, αQE and DBA combination.

    FOLDER has one sub-folder per class. Query expansion (αQE) and database-side
    augmentation (DBA) are each tried off and on. Each image queries all the others through the same search code as the API. αQE and
    DBA are applied in memory: the index on disk is never changed.
    """
    from ..evaluate import evaluate_models

    settings = load_settings(db=db)
    if not models:
        open_index(settings.location, settings).close()  # a mistyped --db: one line, no file
    bars: list[Progress] = []

    def on_model(name: str, total: int) -> Any:
        for bar in bars:
            bar.__exit__(None, None, None)
        bar = Progress(f"Embedding with {name}", total).__enter__()
        bars.append(bar)
        return bar.update

    try:
        rows = evaluate_models(settings, folder, models, k, on_model=on_model)
    finally:
        if bars:
            bars[-1].__exit__(None, None, None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{rows[0]['queries']} queries over {rows[0]['classes']} classes, k = {k}")
    click.echo(f"{'model':<20} {'images/s':>8} {'αQE':>4} {'DBA':>4} {'P@k':>7} {'mAP':>7}")
    for r in rows:
        speed = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-"
        click.echo(
            f"{r['model']:<20} {speed:>8} {'on' if r['expand'] else 'off':>4} "
            f"{'on' if r['dba'] else 'off':>4} {r['precision_at_k']:>7.4f} {r['map']:>7.4f}"
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
@click.option(
    "--timeout-keep-alive",
    default=5,
    show_default=True,
    type=click.IntRange(1, 3600),
    help="Seconds an idle kept-alive connection stays open.",
)
@click.option(
    "--timeout-headers",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.5, 3600),
    help="Seconds a client has to send its request line and headers.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(8),
    help="Open connections at most; beyond, the longest idle one is closed "
    "(default: what the open-file limit leaves room for, at most 4096).",
)
def serve(
    db: str | None,
    host: str,
    port: int,
    timeout_keep_alive: int,
    timeout_headers: float,
    max_connections: int | None,
) -> None:
    """Serve the HTTP API, hardened for public use (see README, Robustness).

    The same app as `uvicorn main:app`, plus what uvicorn alone lacks: a deadline for
    request headers, a cap on open connections that drops idle ones first, and the
    open-file limit raised to its maximum. Upload bodies that arrive too slowly are cut
    off by the app under either command."""
    import uvicorn

    from ..server.app import create_app, raise_file_limit
    from ..server.logs import uvicorn_log_config
    from ..server.protocol import GuardedH11Protocol, connection_budget

    raise_file_limit()  # first: the connection cap is derived from it
    cap, backlog = connection_budget()
    protocol = GuardedH11Protocol.configured(timeout_headers, max_connections or cap)
    settings = load_settings(db=db)
    # uvicorn's lines in the configured format; its access log gives way to the request
    # line of server/observe.py.
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=timeout_keep_alive,
        backlog=backlog,
        log_config=uvicorn_log_config(settings),
        access_log=False,
    )
