"""``ingest``: download and embed a catalogue in one streaming pass."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..model.registry import MODELS, spec_for, weights_file
from .base import command, db_option, load_settings
from .catalogue import fetch_options, fetch_settings, nothing_downloaded, source_options
from .progress import Progress

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..catalog import Row
    from ..config import Settings
    from ..download import DownloadOptions, Outcome
    from ..indexer import Summary
    from ..ingest import Fetched
    from ..rayengine import RayOptions
    from ..store import Store


@command()
@source_options("--csv", "--csv-file", "--csv_file")
@db_option
@click.option(
    "--model",
    type=click.Choice(list(MODELS)),
    help="Embedding model for a new index (default: $IMAGEFINDER_MODEL or resnet50).",
)
@click.option("--weights", help="The model's weights (also $IMAGEFINDER_WEIGHTS).")
@click.option("--batch-size", type=click.IntRange(1, 256), help="Images per forward pass.")
@click.option(
    "--decode-workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Decoding threads.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: a Ray Data pipeline on a cluster "
    "(pip install 'imagefinder[ray]').",
)
@click.option(
    "--ray-address",
    help="The Ray cluster to run on (ray://host:10001, or auto for the one `ray start` "
    "began here; default: $IMAGEFINDER_RAY_ADDRESS, else a cluster started on this machine).",
)
@click.option(
    "--actors",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="--engine ray: embedding actors (one model each).",
)
@click.option(
    "--actor-cpus",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.01, 256),
    help="--engine ray: CPUs Ray reserves per actor (fractions let downloads run beside "
    "them on a small machine).",
)
@fetch_options
def ingest(
    csv_file: str,
    output_dir: str,
    manifest: str | None,
    db: str | None,
    model: str | None,
    weights: str | None,
    batch_size: int | None,
    workers: int,
    decode_workers: int,
    timeout: float,
    deadline: float,
    retries: int,
    max_mb: int,
    engine: str,
    ray_address: str | None,
    actors: int,
    actor_cpus: float,
    allow_private: bool,
) -> None:
    """Download a catalogue's images and embed them into the index in one pass.

    Embedding starts while downloads go on. Like `extract`, it is idempotent per id and
    content hash: a second run (or one after a crash) redoes nothing already indexed.
    """
    from .. import augment
    from ..catalog import read_catalog
    from ..download import Downloader
    from ..indexer import LiveStates, Summary, Writer, finish_run
    from ..ingest import Ingest, downloads
    from ..rayengine import RayOptions
    from ..service import Service

    if not Path(csv_file).is_file():
        raise click.UsageError(f"{csv_file}: no such file; pass the catalogue CSV with --csv")
    rows = read_catalog(csv_file)
    settings = load_settings(db=db, batch_size=batch_size)
    options = fetch_settings(settings, workers, timeout, deadline, retries, max_mb, allow_private)
    service = Service(settings)
    store = service.store
    name, chosen_weights = service.choose_model(model, weights)
    new_index = not store.meta()
    if engine == "ray" and not (new_index and weights_file(chosen_weights)):
        # The actors load the model; this process only drives them, so it needs the
        # model's identity, not the model (torch's import alone took ~3 s of CPU that
        # the actors' start-up competes for on a small machine). A new index from a
        # weights file is the exception: only loading tells that the file holds
        # weights of this model, and the index must not be named after one that does not.
        identity = spec_for(name).identity(chosen_weights)
    else:
        click.echo(f"Loading {name} ...", err=True)
        embedder = service.load_writer(model, weights)
        identity = embedder.meta()
    store.ensure_schema(identity)
    if new_index and settings.dba:
        augment.set_enabled(store, True, compute=False)
    if rows:
        augment.mark_stale(store)  # cleared by the refresh at the end: a crash keeps it
    store.begin_bulk(len(rows))

    def label(item: Row | Outcome) -> str:
        return f"{csv_file}:{item.line}"

    if engine == "ray":
        address = ray_address or settings.ray_address
        # Models kept warm serve the next job only on a cluster that outlives this command.
        keep_warm = settings.ray_keep_warm if address else 0
        summary, outcomes = _on_ray(
            rows, store, settings, name, chosen_weights, output_dir, options, label,
            RayOptions(address, actors, actor_cpus, keep_warm=keep_warm),
        )  # fmt: skip
        finish_run(store, summary)
        _report(store, summary, outcomes, manifest, output_dir, rows)
        return
    summary = Summary()
    with Progress("Ingesting", len(rows)) as progress:

        def fetched(item: Fetched) -> None:
            if item.path is None and item.outcome is not None:
                progress.note(f"skipping {item.label}: {item.reason} ({item.outcome.url})")

        writer = Writer(
            store,
            embedder,
            LiveStates(store),
            summary,
            settings.batch_size,
            settings.max_pixels,
            on_progress=progress.update,
            on_skip=lambda where, reason: progress.note(f"skipping {where}: {reason}"),
        )
        run = Ingest(writer, workers=decode_workers, on_fetched=fetched)
        run.run(downloads(rows, Downloader(output_dir, options), label), len(rows))
    finish_run(store, summary)
    _report(store, summary, run.outcomes, manifest, output_dir, rows)


def _on_ray(
    rows: list[Row],
    store: Store,
    settings: Settings,
    model: str,
    weights: str | None,
    output_dir: str,
    download: DownloadOptions,
    label: Callable[[Row | Outcome], str],
    options: RayOptions,
) -> tuple[Summary, list[Outcome]]:
    from ..rayengine import ingest as ray_ingest
    from ..rayengine import session

    click.echo(f"Starting the Ray pipeline ({options.address or 'a local cluster'}) ...", err=True)
    with Progress("Ingesting", len(rows)) as progress:

        def row_done(outcome: Outcome, result: str) -> None:
            if result == "failed":
                where = f" ({outcome.url})" if outcome.status == "failed" and outcome.url else ""
                progress.note(f"skipping {label(outcome)}: {outcome.reason}{where}")
            progress.update(1)

        with session(options.address):
            # The full location (a PostgreSQL password included): the workers connect
            # with it.
            run = ray_ingest(
                rows, store, settings.location, model, weights, settings, output_dir,
                download, options, on_row=row_done,
            )  # fmt: skip
    return run.summary, run.outcomes


def _report(
    store: Store,
    summary: Summary,
    outcomes: list[Outcome],
    manifest: str | None,
    output_dir: str,
    rows: list[Row],
) -> None:
    from ..download import write_manifest

    manifest_path = Path(manifest or Path(output_dir) / "manifest.csv")
    write_manifest(manifest_path, sorted(outcomes, key=lambda o: o.line))
    total = store.count()
    store.close()
    counts = {s: sum(o.status == s for o in outcomes) for s in ("downloaded", "skipped", "failed")}
    click.echo(
        f"{counts['downloaded']} downloaded, {counts['skipped']} already there, "
        f"{counts['failed']} failed; {summary.line()}; index {store.location} now holds "
        f"{total} images; manifest: {manifest_path}"
    )
    if summary.augmented:
        click.echo(f"DBA: augmented vectors recomputed for {summary.augmented} images", err=True)
    if rows and counts["downloaded"] + counts["skipped"] == 0:
        raise click.ClickException(nothing_downloaded(outcomes, manifest_path))
