"""Using an index: ``search`` it, show its ``info``, ``eval``uate it, ``copy`` it, ``serve`` it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..model.registry import MODELS
from .base import command, db_option, load_settings


@command()
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--text", help="Search by a text instead of IMAGES (indexes of a text model).")
@db_option
@click.option(
    "--index", help="With several indexes in $IMAGEFINDER_DB: which one (default: the first)."
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
    from ..query import SearchOptions
    from ..service import Indexes

    if bool(images) == (text is not None):
        raise click.UsageError(
            "give either an IMAGE or --text, not both or neither (several IMAGEs are "
            "searched as one)"
        )
    service = Indexes(load_settings(db=db)).get(index)
    options = SearchOptions(
        k=k, expand=expand, offset=offset, max_distance=max_distance, where=parse_filter(filters)
    )
    if text is not None:
        found = service.search_text(text, options)
    else:
        found = service.search_uploads([Path(image).read_bytes() for image in images], options)
    answer = service.response(found)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    for r in answer["results"]:
        mark = f"  [{r['match']}]" if r["match"] else ""
        fields = "  " + " ".join(f"{key}={value}" for key, value in r["metadata"].items())
        click.echo(f"{r['distance']:.4f}  {r['id']}{mark}{fields.rstrip()}")


@command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(db: str | None, as_json: bool) -> None:
    """Show what an index holds: model, dimension, metric, count."""
    from ..model.registry import embeds_text
    from ..store import open_store

    settings = load_settings(db=db)
    store = open_store(settings.location)
    meta = store.meta()
    if not meta:
        raise click.ClickException(
            f"{settings.location} is not an index yet; build one with: "
            f"imagefinder extract --folder DIR --db {settings.location}"
        )
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
    bars: list[Any] = []

    def on_model(name: str, total: int) -> Any:
        for bar in bars:
            bar.render_finish()
        bar = click.progressbar(length=total, label=f"Embedding with {name}", file=sys.stderr)
        bars.append(bar)
        return bar.update

    rows = evaluate_models(settings, folder, models, k, on_model=on_model)
    for bar in bars:
        bar.render_finish()
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
