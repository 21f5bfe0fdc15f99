"""Writing over the API: add, replace or delete one image, behind a bearer token.

Search stays public. Every route on this router needs
``Authorization: Bearer <IMAGEFINDER_API_TOKEN>``; with no token configured the
routes answer 403, so a forgotten setting closes writes rather than opening them.

An added image is checked and embedded first, then saved under the catalogue
folder (``IMAGEFINDER_IMAGES_DIR``) as ``<id>.<ext>`` through a temporary file and
a rename, then upserted into the index. A crash at any point leaves either the
old image or the new one, never half a file; a file saved but not yet indexed is
picked up by the next ``extract`` over that folder.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Security, UploadFile
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from ..catalog import id_problem
from ..errors import InvalidRequest, Unauthorized, WritesDisabled, unknown_id
from ..files import save_bytes, sha256_file
from ..images import sniff
from ..service import Service
from ..store import Item
from .deps import ServiceDep, read_upload
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


def add_image(service: Service, image_id: str, data: bytes) -> ImageWritten:
    """Embed ``data`` and add it as ``image_id``, replacing any image with that id."""
    problem = id_problem(image_id)
    if problem:
        raise InvalidRequest(problem, code="invalid_id")
    # The first write creates the index, so decode fully first: a broken file must not
    # leave an empty index behind. Later writes decode once, while embedding.
    if service.store.meta():
        fmt = sniff(data)
    else:
        fmt = service.decoder.probe(data, service.settings.max_pixels)
    embedder = service.ensure_index()
    vector = service.embed_upload(data, embedder)  # decodes fully: a bad file stops here
    folder = Path(service.settings.images_dir)
    # Placing the file and upserting its row happen under the store's write lock for this
    # id, which every thread, worker process (and, on PostgreSQL, machine) shares: two
    # uploads of one id never interleave (one's twin-removal deleting the other's file).
    with service.store.write_lock(image_id):
        replaced = service.store.path_of(image_id) is not None
        path = save_bytes(folder, image_id, fmt, data).resolve()
        st = path.stat()
        item = Item(image_id, str(path), sha256_file(path), st.st_size, st.st_mtime_ns, vector)
        service.store.upsert([item])
    return ImageWritten(id=image_id, replaced=replaced, format=fmt, bytes=len(data))


def remove_image(service: Service, image_id: str) -> ImageDeleted:
    """Drop ``image_id`` from the index, and its file if it lives in the catalogue folder.

    Files elsewhere (a folder indexed in place) belong to the user and are left alone.
    """
    if not service.store.meta():  # no index: nothing to delete, and nothing to create
        raise unknown_id(image_id)
    with service.store.write_lock(image_id):
        path = service.store.path_of(image_id)
        if path is None:
            raise unknown_id(image_id)
        service.store.delete([image_id])
        file = Path(path)
        owned = file.resolve().is_relative_to(Path(service.settings.images_dir).resolve())
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
)
async def post_image(
    request: Request,
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, GIF, WebP, BMP, TIFF)")],
    image_id: Annotated[
        str, Form(alias="id", description="Letters, digits, '_', '-', '.'; at most 128")
    ],
) -> ImageWritten:
    data = await read_upload(file, service)
    return await gate_of(request).run(add_image, service, image_id, data)


@router.delete(
    "/images/{image_id:path}",
    response_model=ImageDeleted,
    responses={**AUTH_ERRORS, **errors(_404="Unknown id")},
    summary="Remove an image from the index",
)
async def delete_image(request: Request, service: ServiceDep, image_id: str) -> ImageDeleted:
    return await gate_of(request).run(remove_image, service, image_id)
