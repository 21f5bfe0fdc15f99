"""Building a catalogue: ``download`` its images, ``extract`` their vectors into the index."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..model.registry import MODELS, PRECISIONS
from .base import command, db_option, load_settings
from .progress import Progress

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import Settings
    from ..download import DownloadOptions, Outcome


def source_options(*csv_names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The catalogue CSV (under ``csv_names``, the first shown in messages), the folder the
    images go to and the manifest: for every command that fetches a catalogue."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            [
                click.option(
                    *csv_names,
                    "csv_file",
                    required=True,
                    type=click.Path(dir_okay=False),
                    help="CSV with a header 'url,id'.",
                ),
                click.option(
                    "--output-dir",
                    "--output_dir",
                    default="data/images",
                    show_default=True,
                    help="Folder the images are saved to, as <id>.<ext>.",
                ),
                click.option(
                    "--manifest",
                    type=click.Path(dir_okay=False),
                    help="Where to write every row's download outcome (default: "
                    "<output-dir>/manifest.csv).",
                ),
            ]
        ):
            f = option(f)
        return f

    return apply


def fetch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The downloader's options, for every command that fetches a catalogue."""
    for option in reversed(
        [
            click.option(
                "--workers",
                default=8,
                show_default=True,
                type=click.IntRange(1, 64),
                help="Concurrent downloads.",
            ),
            click.option(
                "--timeout",
                default=20.0,
                show_default=True,
                type=click.FloatRange(0.1),
                help="Seconds to wait for a server before retrying.",
            ),
            click.option(
                "--deadline",
                default=120.0,
                show_default=True,
                type=click.FloatRange(1),
                help="Seconds one file may take in all: attempts, retries and a slow server.",
            ),
            click.option(
                "--allow-private",
                is_flag=True,
                help="Also download from loopback, private and link-local addresses (refused "
                "by default: a catalogue URL must not reach this machine's or this network's "
                "services).",
            ),
            click.option(
                "--retries",
                default=3,
                show_default=True,
                type=click.IntRange(0, 10),
                help="Retries for timeouts, dropped connections, 429 and 5xx.",
            ),
            click.option(
                "--max-mb",
                default=50,
                show_default=True,
                type=click.IntRange(1),
                help="Largest file accepted, in MB.",
            ),
        ]
    ):
        f = option(f)
    return f


def fetch_settings(
    settings: Settings,
    workers: int,
    timeout: float,
    deadline: float,
    retries: int,
    max_mb: int,
    allow_private: bool,
) -> DownloadOptions:
    """``DownloadOptions`` from ``fetch_options``' values."""
    from ..download import DownloadOptions

    return DownloadOptions(
        timeout=timeout,
        retries=retries,
        max_bytes=max_mb * 1024 * 1024,
        max_pixels=settings.max_pixels,
        workers=workers,
        deadline=deadline,
        allow_private=allow_private,
    )


@command()
@source_options("--csv_file", "--csv-file")
@fetch_options
def download(
    csv_file: str,
    output_dir: str,
    manifest: str | None,
    workers: int,
    timeout: float,
    deadline: float,
    allow_private: bool,
    retries: int,
    max_mb: int,
) -> None:
    """Download every image listed in a CSV of `url,id` rows.

    Further columns (category, brand, price...) are the images' metadata: they are
    written to metadata.csv in the output folder, which `extract` reads.
    """
    from ..catalog import catalog_columns, read_catalog
    from ..download import Downloader, write_manifest
    from ..metadata import SIDECAR, write_sidecar

    if not Path(csv_file).is_file():
        raise click.UsageError(f"{csv_file}: no such file; pass the catalogue CSV with --csv_file")
    rows = read_catalog(csv_file)
    settings = load_settings()
    options = fetch_settings(settings, workers, timeout, deadline, retries, max_mb, allow_private)
    downloader = Downloader(output_dir, options)
    refused = {row.line for row in rows if row.problem}
    with Progress("Downloading", len(rows)) as progress:
        for row in rows:
            if row.problem:
                progress.note(f"skipping {csv_file}:{row.line}: {row.problem}")

        def done(outcome: Outcome) -> None:
            if outcome.status == "failed" and outcome.line not in refused:
                progress.note(
                    f"skipping {csv_file}:{outcome.line}: {outcome.reason} ({outcome.url})"
                )
            progress.update(1)

        outcomes = downloader.run(rows, on_done=done)
    manifest_path = Path(manifest or Path(output_dir) / "manifest.csv")
    write_manifest(manifest_path, outcomes)
    # A CSV without metadata columns still rewrites an earlier sidecar: the CSV is the
    # source of its images' metadata, and its columns may have been removed.
    columns = catalog_columns(Path(csv_file).read_bytes(), csv_file)
    sidecar = Path(output_dir) / SIDECAR
    if columns or sidecar.exists():
        write_sidecar(sidecar, columns, ((r.id, r.metadata) for r in rows if not r.problem))
        click.echo(f"metadata ({', '.join(columns) or 'no columns'}): {sidecar}", err=True)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("downloaded", "skipped", "failed")}
    click.echo(
        f"{counts['downloaded']} downloaded, {counts['skipped']} skipped (already there), "
        f"{counts['failed']} failed; manifest: {manifest_path}"
    )
    if counts["downloaded"] + counts["skipped"] == 0:
        raise click.ClickException(nothing_downloaded(outcomes, manifest_path))


def nothing_downloaded(outcomes: list[Outcome], manifest: Path) -> str:
    """Why a run got nothing, named by the most common network cause when there is one."""
    from ..network import ADVICE

    causes = Counter(o.cause for o in outcomes if o.cause in ADVICE)
    message = "nothing usable was downloaded"
    if causes:
        cause, n = causes.most_common(1)[0]
        message += f": {n} of {len(outcomes)} rows failed because {ADVICE[cause]}"
    return f"{message}; reasons in {manifest}. Without network, try: make demo"


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


@command()
@click.option(
    "--folder",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of images; sub-folders are included, ids are file stems.",
)
@db_option
@click.option(
    "--model",
    type=click.Choice(list(MODELS)),
    help="Embedding model (default: $IMAGEFINDER_MODEL or resnet50).",
)
@click.option(
    "--weights",
    help="The model's weights (also $IMAGEFINDER_WEIGHTS). "
    + "; ".join(f"{spec.name}: {spec.weights_help}" for spec in MODELS.values())
    + ".",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
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
@click.option(
    "--metadata",
    "metadata_file",
    type=click.Path(exists=True, dir_okay=False),
    help="CSV of the images' metadata: an 'id' column and one column per field (the "
    "catalogue CSV will do). Default: metadata.csv in FOLDER, as `download` writes it. "
    "Applied to every listed image when the file changed since the last run, else to "
    "new images only.",
)
@click.option(
    "--dba/--no-dba",
    default=None,
    help="Turn database-side augmentation on or off for this index (kept in the index; "
    "default: as it is, and $IMAGEFINDER_DBA, on, for a new index).",
)
def extract(
    folder: str,
    db: str | None,
    model: str | None,
    weights: str | None,
    precision: str | None,
    batch_size: int | None,
    workers: int,
    prune: bool,
    shard: str | None,
    metadata_file: str | None,
    dba: bool | None,
) -> None:
    """Embed every image in a folder into the index, incrementally."""
    from ..indexer import apply_metadata, calibration_sample, in_shard, index_folder
    from ..metadata import SIDECAR
    from ..service import Service

    shard_spec = parse_shard(shard)
    settings = load_settings(db=db, precision=precision, batch_size=batch_size)
    service = Service(settings)
    store = service.store
    # An index remembers its model and weights: extending it needs neither option.
    name, _ = service.choose_model(model, weights)
    if dba is None and not store.meta():
        dba = settings.dba
    click.echo(f"Loading {name} ...", err=True)
    calibration = calibration_sample(folder) if settings.precision == "int8" else ()
    embedder = service.load_writer(model, weights, calibration)
    with Progress("Embedding") as progress:
        summary = index_folder(
            folder,
            store,
            embedder,
            batch_size=settings.batch_size,
            workers=workers,
            prune=prune,
            max_pixels=settings.max_pixels,
            select=(lambda i: in_shard(i, shard_spec)) if shard_spec else None,
            dba=dba,
            on_total=progress.total,
            on_progress=progress.update,
            on_skip=lambda path, reason: progress.note(f"skipping {path}: {reason}"),
        )
    sidecar = Path(metadata_file) if metadata_file else Path(folder) / SIDECAR
    if sidecar.is_file():
        written, refused = apply_metadata(store, sidecar, summary.added, shard_spec)
        for where, reason in refused:
            click.echo(f"skipping {where}: {reason}", err=True)
        if written:
            click.echo(f"metadata: {written} images updated from {sidecar}", err=True)
    total = store.count()
    store.close()
    click.echo(f"{summary.line()}; index {store.location} now holds {total} images")
    if summary.augmented:
        click.echo(f"DBA: augmented vectors recomputed for {summary.augmented} images", err=True)
    if summary.missing:
        click.echo(
            f"{summary.missing} indexed files no longer exist; run with --prune to remove them",
            err=True,
        )
