"""Writing over the API: add, replace or delete one image, behind a bearer token.

Search stays public. Every route on this router needs
``Authorization: Bearer <IMAGEFINDER_API_TOKEN>``; with no token configured the
routes answer 403, so a forgotten setting closes writes rather than opening them.

An added image is checked and embedded first, then saved under the catalogue
folder (``IMAGEFINDER_IMAGES_DIR``) as ``<id>.<ext>`` through a temporary file and
a rename, then upserted into the index. A crash at any point leaves either the
old image or the new one, never half a file; a file saved but not yet indexed is
picked up by the next ``extract`` over that folder.

A server with several indexes serves one catalogue folder: a write goes to every index,
each embedding the image with its own model (all of them first, so a model that cannot
load stops the write before anything is saved).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Security, UploadFile
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import FormData

from ..catalog import id_problem
from ..errors import InvalidRequest, Unauthorized, WritesDisabled, unknown_id
from ..files import save_bytes, sha256_file
from ..images import sniff
from ..indexes import Indexes
from ..metadata import MAX_FIELDS, MAX_NAME, MAX_VALUE, Metadata, clean
from ..store import Item
from .deps import IndexesDep, read_upload
from .gate import GatedRoute, gate_of
from .schemas import AUTH_ERRORS, ImageDeleted, ImageWritten, errors


def check_token(request: Request) -> None:
    """Raise unless ``request`` carries the configured bearer token."""
    token = request.app.state.service.settings.api_token
    if not token:
        raise WritesDisabled(
            "writes are disabled on this server; set IMAGEFINDER_API_TOKEN to enable them"
        )
    scheme, given = get_authorization_scheme_param(request.headers.get("Authorization"))
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized(
            "missing bearer token: send 'Authorization: Bearer <IMAGEFINDER_API_TOKEN>'"
        )
    # Bytes, because compare_digest refuses non-ASCII str; constant time either way.
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("wrong bearer token")


class TokenFirstRoute(GatedRoute):
    """Checks the token before taking a place in the gate and before FastAPI reads the
    body: an anonymous client cannot make the server receive and parse an upload only
    to be refused afterwards, nor hold a place another client could use."""

    def before_admission(self, request: Request) -> None:
        check_token(request)


# Security(...) only documents the scheme in OpenAPI; TokenFirstRoute does the check.
router = APIRouter(
    route_class=TokenFirstRoute,
    dependencies=[Security(HTTPBearer(auto_error=False))],
    tags=["writes"],
)


def add_image(
    indexes: Indexes, image_id: str, data: bytes, metadata: Metadata | None = None
) -> ImageWritten:
    """Embed ``data`` and add it as ``image_id`` to every index, replacing any image with
    that id. ``metadata`` replaces the image's metadata; None keeps what it had."""
    problem = id_problem(image_id)
    if problem:
        raise InvalidRequest(problem, code="invalid_id")
    settings = indexes.settings
    # The first write creates an index, so decode fully first: a broken file must not
    # leave an empty index behind. Later writes decode once, while embedding.
    exist = all(service.store.meta() for service in indexes)
    fmt = sniff(data) if exist else indexes.default.decoder.probe(data, settings.max_pixels)
    vectors = []
    for service in indexes:
        embedder = service.ensure_index()
        vectors.append((service, service.embed_upload(data, embedder)))  # a bad file stops here
    folder = Path(settings.images_dir)
    # Placing the file and upserting its rows happen under the default index's write lock
    # for this id, which every thread, worker process (and, on PostgreSQL, machine)
    # shares: two uploads of one id never interleave (one's twin-removal deleting the
    # other's file).
    with indexes.default.store.write_lock(image_id):
        replaced = any(service.store.path_of(image_id) is not None for service in indexes)
        near = {service.name: service.neighbourhood([image_id]) for service in indexes}
        path = save_bytes(folder, image_id, fmt, data).resolve()
        st = path.stat()
        digest = sha256_file(path)
        for service, vector in vectors:
            item = Item(image_id, str(path), digest, st.st_size, st.st_mtime_ns, vector)
            service.store.upsert([item])
            if metadata is not None:
                service.store.set_metadata([(image_id, metadata)])
            service.after_write([image_id], near[service.name])
    return ImageWritten(id=image_id, replaced=replaced, format=fmt, bytes=len(data))


def remove_image(indexes: Indexes, image_id: str) -> ImageDeleted:
    """Drop ``image_id`` from every index, and its file if it lives in the catalogue folder.

    Files elsewhere (a folder indexed in place) belong to the user and are left alone.
    """
    if not any(service.store.meta() for service in indexes):
        raise unknown_id(image_id)  # no index: nothing to delete, and nothing to create
    with indexes.default.store.write_lock(image_id):
        paths = {
            service.name: service.store.path_of(image_id) if service.store.meta() else None
            for service in indexes
        }
        found = [p for p in paths.values() if p is not None]
        if not found:
            raise unknown_id(image_id)
        for service in indexes:
            if paths[service.name] is not None:
                near = service.neighbourhood([image_id])
                service.store.delete([image_id])
                service.after_write([], near)
        file = Path(found[0])
        owned = file.resolve().is_relative_to(Path(indexes.settings.images_dir).resolve())
        removed = owned and file.is_file()
        if removed:
            file.unlink()
    return ImageDeleted(id=image_id, file_removed=removed)


@router.post(
    "/images",
    status_code=201,
    response_model=ImageWritten,
    responses=AUTH_ERRORS,
    summary="Add an image to the index, or replace the one with the same id",
    description="Every other form field is metadata of the image: `-F category=shoes -F "
    f"brand=acme` (strings; at most {MAX_FIELDS} fields, names up to {MAX_NAME} characters "
    f"without '=', values up to {MAX_VALUE}; an empty value is no value). Fields given "
    "replace the image's metadata; with none, a replaced image keeps the metadata it had.",
)
async def post_image(
    request: Request,
    indexes: IndexesDep,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, GIF, WebP, BMP, TIFF)")],
    image_id: Annotated[
        str, Form(alias="id", description="Letters, digits, '_', '-', '.'; at most 128")
    ],
) -> ImageWritten:
    metadata = metadata_fields(await request.form())
    data = await read_upload(file, indexes.default)
    return await gate_of(request).run(add_image, indexes, image_id, data, metadata)


def metadata_fields(form: FormData) -> Metadata | None:
    """The form's fields other than ``file`` and ``id``, as metadata; None when there
    are none."""
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if name in ("file", "id"):
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"metadata field {name[:40]!r} is a file; send text")
        if name in fields:
            raise InvalidRequest(f"metadata field {name[:40]!r} is given twice")
        fields[name] = value
    return clean(fields, "metadata field") if fields else None


@router.delete(
    "/images/{image_id:path}",
    response_model=ImageDeleted,
    responses={**AUTH_ERRORS, **errors(_404="Unknown id")},
    summary="Remove an image from the index",
)
async def delete_image(request: Request, indexes: IndexesDep, image_id: str) -> ImageDeleted:
    return await gate_of(request).run(remove_image, indexes, image_id)
