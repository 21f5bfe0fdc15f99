"""The ``imagefinder`` command. Each subcommand is a thin shell over the package."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import click

from . import __version__
from .config import Settings

# Options shared by commands that open an index.
db_option = click.option(
    "--db",
    help="Index: a SQLite file, or a postgresql:// URL "
    "(default: $IMAGEFINDER_DB or data/imagefinder.db).",
)


def friendly_errors(fn):
    """Turn the package's user-facing errors into one-line ClickExceptions."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .catalog import CatalogError
        from .images import ImageError
        from .store import StoreError

        try:
            return fn(*args, **kwargs)
        except (CatalogError, StoreError, ImageError) as e:
            raise click.ClickException(str(e)) from e
        except RuntimeError as e:
            # Importing embed here would load torch (seconds) for every command, even
            # `download`; a ModelUnavailable can only come from an already-loaded embed.
            embed = sys.modules.get(f"{__package__}.embed")
            if embed is not None and isinstance(e, embed.ModelUnavailable):
                raise click.ClickException(str(e)) from e
            raise
        except ValueError as e:  # bad IMAGEFINDER_* values
            raise click.ClickException(str(e)) from e

    return wrapper


def load_settings(**overrides) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ValueError as e:
        raise click.ClickException(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imagefinder")
def cli() -> None:
    """ImageFinder: find the catalogue images that look most like a photo.

    Typical use: `imagefinder download --csv_file images.csv`, then
    `imagefinder extract --folder data/images`, then `imagefinder serve`.
    """


@cli.command()
@click.option(
    "--csv_file",
    "--csv-file",
    "csv_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="CSV with a header 'url,id'.",
)
@click.option(
    "--output-dir",
    "--output_dir",
    default="data/images",
    show_default=True,
    help="Folder the images are saved to, as <id>.<ext>.",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False),
    help="Where to write every row's outcome (default: <output-dir>/manifest.csv).",
)
@click.option(
    "--workers",
    default=8,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Concurrent downloads.",
)
@click.option(
    "--timeout",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds to wait for a server before retrying.",
)
@click.option(
    "--retries",
    default=3,
    show_default=True,
    type=click.IntRange(0, 10),
    help="Retries for timeouts, dropped connections, 429 and 5xx.",
)
@click.option(
    "--max-mb",
    default=50,
    show_default=True,
    type=click.IntRange(1),
    help="Largest file accepted, in MB.",
)
@friendly_errors
def download(csv_file, output_dir, manifest, workers, timeout, retries, max_mb) -> None:
    """Download every image listed in a CSV of `url,id` rows."""
    from .catalog import read_catalog
    from .download import Downloader, DownloadOptions, write_manifest

    if not Path(csv_file).is_file():
        raise click.UsageError(f"{csv_file}: no such file; pass the catalogue CSV with --csv_file")
    rows = read_catalog(csv_file)
    settings = load_settings()
    options = DownloadOptions(
        timeout=timeout,
        retries=retries,
        max_bytes=max_mb * 1024 * 1024,
        max_pixels=settings.max_pixels,
        workers=workers,
    )
    for row in rows:
        if row.problem:
            click.echo(f"skipping {csv_file}:{row.line}: {row.problem}", err=True)
    downloader = Downloader(output_dir, options)
    with click.progressbar(length=len(rows), label="Downloading", file=sys.stderr) as bar:

        def done(outcome):
            if outcome.status == "failed" and not any(
                r.line == outcome.line and r.problem for r in rows
            ):
                click.echo(f"\nskipping {outcome.id} ({outcome.url}): {outcome.reason}", err=True)
            bar.update(1)

        outcomes = downloader.run(rows, on_done=done)
    manifest = Path(manifest or Path(output_dir) / "manifest.csv")
    write_manifest(manifest, outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("downloaded", "skipped", "failed")}
    click.echo(
        f"{counts['downloaded']} downloaded, {counts['skipped']} skipped (already there), "
        f"{counts['failed']} failed; manifest: {manifest}"
    )
    if counts["downloaded"] + counts["skipped"] == 0:
        raise click.ClickException("nothing usable was downloaded; see the manifest for reasons")


def parse_shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("use the form i/n, for example 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"need 0 <= i < n, got {value}")
    return i, n


def in_shard(image_id: str, shard: tuple[int, int]) -> bool:
    """Stable across machines and Python runs (unlike hash())."""
    digest = hashlib.sha1(image_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0]


@cli.command()
@click.option(
    "--folder",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of images; sub-folders are included, ids are file stems.",
)
@db_option
@click.option(
    "--model",
    type=click.Choice(["resnet50", "efficientnet-lite0"]),
    help="Embedding model (default: $IMAGEFINDER_MODEL or resnet50).",
)
@click.option(
    "--weights",
    help="resnet50 weights: IMAGENET1K_V1 (default), IMAGENET1K_V2, "
    "or a local .pth file. Also $IMAGEFINDER_WEIGHTS.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "bf16-ov", "int8"]),
    help="fp32 (default); bf16 (PyTorch autocast) is faster on CPUs with AVX-512 "
    "BF16; bf16-ov and int8 (fastest) run in OpenVINO: pip install "
    "'imagefinder[openvino]'.",
)
@click.option("--batch-size", type=click.IntRange(1, 256), help="Images per forward pass.")
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Decoding threads running beside inference.",
)
@click.option("--prune", is_flag=True, help="Delete index rows whose files are gone.")
@click.option("--shard", help="Index only shard i of n (by a stable hash of the id), e.g. 0/4.")
@friendly_errors
def extract(folder, db, model, weights, precision, batch_size, workers, prune, shard) -> None:
    """Embed every image in a folder into the index, incrementally."""
    from .embed import load_embedder
    from .indexer import calibration_sample, index_folder
    from .store import open_store

    shard_spec = parse_shard(shard)
    settings = load_settings(
        db=db, model=model, weights=weights, precision=precision, batch_size=batch_size
    )
    store = open_store(settings.db)
    existing = store.meta()
    if existing and model is None:
        # An index remembers its model and weights: extending it needs neither option.
        from .service import weights_for_index

        settings = settings.with_(model=existing["model"])
        if weights is None and existing.get("model") == settings.model:
            settings = settings.with_(weights=weights_for_index(existing, settings))
    click.echo(f"Loading {settings.model} ...", err=True)
    calibration = calibration_sample(folder) if settings.precision == "int8" else ()
    embedder = load_embedder(
        settings.model, settings.weights, settings.precision, settings.threads, calibration
    )
    bar = click.progressbar(length=0, label="Embedding", file=sys.stderr)

    def on_total(n):
        bar.length = n

    summary = index_folder(
        folder,
        store,
        embedder,
        batch_size=settings.batch_size,
        workers=workers,
        prune=prune,
        max_pixels=settings.max_pixels,
        select=(lambda i: in_shard(i, shard_spec)) if shard_spec else None,
        on_total=on_total,
        on_progress=bar.update,
        on_skip=lambda path, reason: click.echo(f"\nskipping {path}: {reason}", err=True),
    )
    bar.render_finish()
    total = store.count()
    store.close()
    click.echo(f"{summary.line()}; index {store.location} now holds {total} images")
    if summary.missing:
        click.echo(
            f"{summary.missing} indexed files no longer exist; run with --prune to remove them",
            err=True,
        )


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@db_option
@click.option(
    "-k", default=3, show_default=True, type=click.IntRange(1, 100), help="How many neighbours."
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON response.")
@friendly_errors
def search(image, db, k, as_json) -> None:
    """Find the indexed images nearest to IMAGE."""
    from .service import Service, ServiceError

    service = Service(load_settings(db=db))
    try:
        results = service.search_bytes(Path(image).read_bytes(), k)
    except ServiceError as e:
        raise click.ClickException(e.message) from e
    if as_json:
        meta = service.store.meta()
        click.echo(
            json.dumps(
                {
                    "model": meta.get("model"),
                    "metric": meta.get("metric"),
                    "results": [{"id": i, "distance": d} for i, d in results],
                },
                indent=2,
            )
        )
    else:
        for image_id, distance in results:
            click.echo(f"{distance:.4f}  {image_id}")


@cli.command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@friendly_errors
def info(db, as_json) -> None:
    """Show what an index holds: model, dimension, metric, count."""
    from .store import open_store

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


@cli.command(name="eval")
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
@friendly_errors
def evaluate(folder, db, k, as_json) -> None:
    """Leave-one-out precision@k and mAP of an index over a labelled folder."""
    from .evaluate import evaluate_index
    from .store import open_store

    settings = load_settings(db=db)
    store = open_store(settings.db, ef_search=settings.ef_search, exact=settings.exact)
    report = evaluate_index(store, folder, k)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{report['queries']} queries over {report['classes']} classes: "
            f"precision@{k} = {report['precision_at_k']:.4f}, mAP = {report['map']:.4f}"
        )


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option(
    "--batch-size",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Rows per transaction.",
)
@friendly_errors
def copy(src, dst, batch_size) -> None:
    """Copy the index SRC into DST (each a SQLite file or a postgresql:// URL).

    Vectors and meta are copied exactly; a DST that already exists must hold the
    same model, and rows with the same id are replaced.
    """
    from .store import open_store
    from .transfer import copy_index

    source, target = open_store(src), open_store(dst)
    with click.progressbar(length=0, label="Copying", file=sys.stderr) as bar:

        def on_total(n):
            bar.length = n

        copied = copy_index(
            source, target, batch=batch_size, on_total=on_total, on_progress=bar.update
        )
    total = target.count()
    source.close()
    target.close()
    click.echo(f"{copied} images copied; {target.location} now holds {total} images")


@cli.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
def serve(db, host, port) -> None:
    """Serve the HTTP API (same as `uvicorn main:app`)."""
    import uvicorn

    from .api import create_app

    uvicorn.run(create_app(load_settings(db=db)), host=host, port=port)


def main() -> None:
    cli()
