"""``duplicates``: the groups of images in an index that are the same file, the same
picture, or alike."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .base import command, db_option, load_settings


@command()
@db_option
@click.option(
    "--index", help="With several indexes in $IMAGEFINDER_DB: which one (default: the first)."
)
@click.option(
    "--level",
    type=click.Choice(["exact", "near", "similar"]),
    default="near",
    show_default=True,
    help="exact: the same file content. near: the same picture re-encoded, resized, "
    "cropped a little, rotated, overlaid or colour-shifted. similar: alike pictures. "
    "near and similar use distances calibrated per model.",
)
@click.option(
    "--max-distance",
    type=click.FloatRange(0),
    help="Group images whose vectors are within this L2 distance instead of the level's "
    "calibrated one (for a model without calibration, or your own cut).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
def duplicates(
    db: str | None, index: str | None, level: str, max_distance: float | None, as_json: bool
) -> None:
    """List groups of duplicate images in the index, largest first.

    Each group starts with its representative (the image most others are close to),
    then the others with their distance to it.
    """
    from .. import duplicates as dup
    from ..indexes import Indexes

    if level == "exact" and max_distance is not None:
        raise click.UsageError(
            "--level exact compares file contents; --max-distance is for near and similar"
        )
    service = Indexes(load_settings(db=db)).get(index)
    store = service.require_index()
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="Comparing", file=sys.stderr)
        bar.update(done - bar.pos)

    report = dup.find(store, level, max_distance, on_progress=progress)
    if bar is not None:
        bar.render_finish()
    store.close()
    if as_json:
        click.echo(json.dumps(dup.as_json(report), indent=2))
        return
    for n, group in enumerate(report.groups, 1):
        click.echo(f"group {n} ({len(group.ids)} images)")
        for image_id, distance in zip(group.ids, group.distances, strict=True):
            click.echo(f"  {distance:.4f}  {image_id}")
    cut = "same content" if report.max_distance is None else f"distance <= {report.max_distance:g}"
    grouped = sum(len(g.ids) for g in report.groups)
    click.echo(
        f"{len(report.groups)} groups, {grouped} of {report.images} images; "
        f"level {report.level} ({cut})",
        err=True,
    )
